"""WeChat Pay (API v3): request signing, response and notification verification, the HTTP
client, and a loopback fake of the service for tests and the demo. See docs/pay.md."""
