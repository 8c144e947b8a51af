"""The paper's model and its training: embedder E, generator G, projection discriminator D,
meta-learning over many people's videos and few-shot fine-tuning of one person.

Never imported by the serving side; imports only `facekit` from outside itself.
"""
