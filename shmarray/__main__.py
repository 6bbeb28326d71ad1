from shmarray.cli import main

raise SystemExit(main())
