"""The web app's user interface, one module per tab: generate.py, compare.py, presenter.py, models.py (each its
layout and handlers, and the API handler it backs), with generate_inputs.py (the Generate tab's start image,
mask and LoRA table), common.py (the state and helpers the tabs share) and present.py (how results look: CSS
and small HTML). app.py puts the tabs together and serves them; backend/ holds the model logic and no UI code.
"""
import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before any tab imports gradio: no analytics, no telemetry
