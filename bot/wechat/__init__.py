"""The WeChat side: the webhook endpoint, safe-mode crypto, the API client, the custom menu
and a loopback fake of the API for tests and the demo."""
