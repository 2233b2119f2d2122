"""Data: COCO / LVIS v1 reading and validation (``annotations``), the detection Dataset
(``dataset``), long-tail statistics (``stats``) and synthetic long-tailed data
(``synthetic``). Nothing is imported here, so ``drcl make-data`` and ``drcl stats`` start
without loading torch."""
