"""The operators' web console (bot.console.core), its one-time links and its pages."""
