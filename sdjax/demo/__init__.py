"""The bundled demo model (a small LDM trained on synthetic captioned shapes), when installed."""
import os

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
