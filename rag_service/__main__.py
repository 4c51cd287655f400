from rag_service.cli import main

raise SystemExit(main())
