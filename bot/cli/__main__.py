"""``python -m bot.cli …``: how the server starts its scheduler and how tests run the CLI."""

from bot.cli import main

main()
