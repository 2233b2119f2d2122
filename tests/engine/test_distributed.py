import torch
import torch.distributed as dist

from drcl.config import drcl_config, load_config
from drcl.engine.distributed import wrap_ddp
from drcl.model.drcl import DRCL


def test_ddp_does_not_broadcast_the_key_queues(tmp_path):
    """DDP broadcasts rank 0's buffers before every forward (``modules_buffers``): the queues,
    the same on every rank by construction, must not be among them; BatchNorm statistics are."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DRCL(drcl_config(load_config("tiny", ["model.norm=bn", "model.hcl_queue=16", "model.lcl_queue=32"])))
        ddp = wrap_ddp(model, torch.device("cpu"), find_unused_parameters=True)
        buffers = dict(model.named_buffers())
        queues = {n for n in buffers if n.startswith(("hcl_queue.", "lcl_queue."))}
        assert len(queues) == 10  # keys, labels, ids, ptr, filled of each queue
        broadcast = {t.data_ptr() for t in ddp.modules_buffers}
        assert not broadcast & {buffers[n].data_ptr() for n in queues}
        assert not set(ddp.named_module_buffers) & queues
        assert buffers["online.encoder.backbone.body.bn1.running_mean"].data_ptr() in broadcast
    finally:
        dist.destroy_process_group()
