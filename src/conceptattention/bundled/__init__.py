"""The bundled model: a small Flux-architecture text-to-image model trained on synthetic scenes."""
