"""The evaluation suite (`talkinghead evaluate`): protocol, methods, face readings, figures."""
