"""CityBridge: IoT middleware for smart cities, with an NGSI-LD context broker at its core."""

__version__ = "0.1.0"
