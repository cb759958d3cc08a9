"""The queen's live dashboard and playground: server-rendered pages, one event stream per
page, a one-time login traded for a browser session (``rbee dashboard``)."""
