from dfq_deploy.cli import main

raise SystemExit(main())
