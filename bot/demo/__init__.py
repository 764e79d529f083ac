"""Trying the bot without WeChat: the self-contained demo and the terminal chat simulator."""
