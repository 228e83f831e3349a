from gputorrent.cli import main

raise SystemExit(main())
