from bench.driver import main

raise SystemExit(main())
