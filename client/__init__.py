"""The talkinghead client: a Python library, the `avatar`, `animate`, `bench` and `verify` commands.

    from client import Client, consent_record, landmark_requests
    from facekit.sequence import LandmarkSequence
    with Client(target="127.0.0.1:50051") as c:
        consent = consent_record(subject="Mona Lisa (Leonardo)", basis="public-domain",
                                 source="https://collections.louvre.fr/ark:/53355/cl010062370",
                                 collected_by="studio@example.com")
        c.create_avatar("mona", ["mona.jpg"], consent=consent)
        frames = list(c.animate("mona", landmark_requests(LandmarkSequence.load("driver.npz"))))

Depends on the generated stubs (api/) and the shared ground (facekit/), never on the server
(service/), training/ or export/: a test checks. The library is `client.library`; each
`*_command` module is one `talkinghead` command (see talkinghead/cli.py).
"""

from client.library import (
    DEFAULT_SERVER,
    Client,
    Frame,
    consent_record,
    decode_frame,
    describe_error,
    image_requests,
    landmark_requests,
    operation_error,
    to_landmarks,
)
from client.verify import FileReport as FileReport  # watermark + C2PA check of a file (verify)
from client.verify import verify_file as verify_file

__all__ = [
    "DEFAULT_SERVER",
    "Client",
    "Frame",
    "consent_record",
    "decode_frame",
    "describe_error",
    "image_requests",
    "landmark_requests",
    "operation_error",
    "to_landmarks",
]
