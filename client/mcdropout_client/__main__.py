"""``python -m mcdropout_client``: the command line client."""

from mcdropout_client.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
