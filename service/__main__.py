"""``python -m service`` serves the API with the GENERALRM_ settings."""

from service.cli import serve

if __name__ == "__main__":
    serve()
