"""Reading and writing video with PyAV, the FFmpeg binding torchvision's own video reader is built on (an
appendix; no torch). PyAV is optional: without it, a video gets one line naming the pip command.

Frames are (H, W, 3) uint8 RGB numpy arrays, in display order. Written videos are H.264 (yuv420p, what
every player reads) at the source's frame rate; their width and height are padded to even numbers, as
yuv420p needs.
"""
from fractions import Fraction
from pathlib import Path

import numpy as np

from config import ConfigError
from appendix.image_io import DataError

CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}


def require_av():
    """The av module, or a ConfigError naming the pip command."""
    try:
        import av
    except ImportError:
        raise ConfigError("video needs PyAV (the FFmpeg binding): pip install av") from None
    return av


class VideoReader:
    """The frames of the video at `path`, as a context manager and an iterator; `fps` and `frames` (the
    container's count, 0 where it does not say) known on opening. Not a video, no video stream, a file that
    cannot be read or decoded: a DataError naming it."""

    def __init__(self, path: str | Path):
        av = require_av()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video {path} does not exist")
        try:
            self.container = av.open(str(path))
        except av.FFmpegError as e:
            raise DataError(f"{path} is not a video PyAV can read ({e.strerror or e})") from None
        if not self.container.streams.video:
            self.container.close()
            raise DataError(f"{path} has no video stream")
        self.stream = self.container.streams.video[0]
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else 25.0
        self.frames = self.stream.frames

    def __iter__(self):
        av = require_av()
        index = 0
        try:
            for frame in self.container.decode(self.stream):
                yield frame.to_ndarray(format="rgb24")
                index += 1
        except av.FFmpegError as e:
            raise DataError(f"{self.path}: cannot decode frame {index} ({e.strerror or e})") from None

    def close(self):
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoWriter:
    """H.264 frames into `path` (its container given by `suffix`, e.g. ".mp4": the path may be a temporary
    name), at `fps` frames per second; frames of any size, padded to even sides with black."""

    def __init__(self, path: str | Path, fps: float, suffix: str):
        av = require_av()
        self.check_suffix(suffix)
        self.container = av.open(str(path), mode="w", format=CONTAINERS[suffix.lower()])
        codec = "libvpx" if suffix.lower() == ".webm" else "libx264"
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        self.frame_class, self.opened = av.VideoFrame, False

    @staticmethod
    def check_suffix(suffix: str, flag: str = "the output video") -> None:
        if suffix.lower() not in CONTAINERS:
            raise ConfigError(f"{flag}: cannot write a {suffix or 'suffix-less'} video; end the name with one of "
                              f"{', '.join(CONTAINERS)}")

    def write(self, frame: np.ndarray):
        H, W = frame.shape[:2]
        if H % 2 or W % 2:
            frame = np.pad(frame, ((0, H % 2), (0, W % 2), (0, 0)))
        if not self.opened:
            self.stream.height, self.stream.width = frame.shape[:2]
            self.opened = True
        self.container.mux(self.stream.encode(self.frame_class.from_ndarray(frame, format="rgb24")))

    def close(self):
        if self.opened:
            self.container.mux(self.stream.encode())  # the frames the encoder still holds
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
