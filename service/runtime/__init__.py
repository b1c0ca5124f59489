"""The native API: sessions, semantic variables and graphs of calls run by the service."""
