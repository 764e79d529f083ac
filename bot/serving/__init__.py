"""The HTTP layer under gunicorn: a worker that reads and buffers every request in an event loop
(h11 parses it) and only then lets a thread run the WSGI app, so slow or idle clients cost a
socket, never a thread. See ``bot.serving.worker`` for the mechanism and its limits."""
