from rtcsignal.cli import main

raise SystemExit(main())
