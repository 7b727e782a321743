from bench.ood.cli import main

raise SystemExit(main())
