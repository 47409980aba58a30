"""The ops console: a live web page over the status topic that publishes control events.

- :mod:`.state`: what the console knows (pure: workers, 15 min history, acks, dead letters);
- :mod:`.guard`: token, cross-site and form checks (pure);
- :mod:`.feed`: the Kafka side (status and dead-letter readers, the control client);
- :mod:`.web`: the aiohttp server; ``static/`` holds the page (HTML, JS, CSS; no build step).
"""
