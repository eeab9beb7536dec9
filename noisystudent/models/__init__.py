"""Models: timm models built, saved and loaded (build), presets by name for per-round architectures
(presets), and a trained model made fast for inference (inference). Imports only the base."""
