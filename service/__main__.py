"""``python -m service``: settings -> logging -> App.serve()."""

from __future__ import annotations

import asyncio
import logging
import sys

from service.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from service.app import App  # noqa: PLC0415 (after logging is set up: it loads onnxruntime)

    async def serve() -> None:
        # Built inside the running loop: grpc.aio binds its server to the current loop.
        await App(settings).serve()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
