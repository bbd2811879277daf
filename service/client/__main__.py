"""``python -m service.client``: the command line client."""

from service.client.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
