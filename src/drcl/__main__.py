from drcl.cli import main

raise SystemExit(main())
