from partlab.cli import main

raise SystemExit(main())
