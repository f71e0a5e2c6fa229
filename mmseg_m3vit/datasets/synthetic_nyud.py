"""Synthetic indoor scenes in the NYUD-MT layout, rendered by vectorised ray casting.

Each scene is a room (floor, four walls, ceiling; doors, pictures and windows on the
walls) furnished with beds, sofas, cabinets, tables, boxes, stools (cylinders), lamps
and balls (spheres), lit by one point light (Lambert + ambient, hard shadows). Every
pixel's ray is cast through the same geometry, so the tasks are consistent:

- RGB: per-class base colour x procedural texture (planks, tiles, wood grain, fabric;
  in world coordinates) x lighting, plus sensor noise; JPEG.
- depth: z-depth in metres along the optical axis (as NYUD); 0 where invalid
  (window glass, as a depth sensor fails there).
- normals: unit surface normals in the camera frame: x to the right of the image,
  y up, z towards the camera (visible surfaces have z > 0); all-zero where depth is
  invalid.
- semantic labels: NYUv2-40 ids (file values 1..40, 0 = void; no void is produced).
- edges: label boundaries plus depth discontinuities (relative jump > 5 %), both with
  the one-sided rule of :func:`~mmseg_m3vit.datasets.edge_utils.label_boundaries`.

Camera: pinhole with the NYUD Kinect's field of view (fx = fy = 0.8107 W, principal
point at the image centre), placed inside the room at 1.0-1.6 m, pitched down 5-25 deg.

Sample ``i`` depends only on ``(seed, i)``, so output is identical for any number of
worker processes. :func:`generate` writes into a temporary folder and renames it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import os.path as osp
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mmseg_m3vit.datasets.edge_utils import label_boundaries

#: NYUv2-40 ids (file values) of the classes the generator draws.
CLASS_IDS: dict[str, int] = {
    "wall": 1, "floor": 2, "cabinet": 3, "bed": 4, "sofa": 6, "table": 7, "door": 8,
    "window": 9, "picture": 11, "ceiling": 22, "box": 29, "lamp": 35,
    "otherfurniture": 39, "otherprop": 40,
}  # fmt: skip

#: Base albedo (linear RGB in [0, 1]) per class; objects jitter around it.
CLASS_COLOURS: dict[str, tuple[float, float, float]] = {
    "wall": (0.80, 0.76, 0.66), "floor": (0.55, 0.38, 0.22), "cabinet": (0.45, 0.28, 0.15),
    "bed": (0.70, 0.72, 0.85), "sofa": (0.35, 0.45, 0.30), "table": (0.60, 0.45, 0.28),
    "door": (0.55, 0.35, 0.20), "window": (0.60, 0.80, 0.95), "picture": (0.85, 0.35, 0.30),
    "ceiling": (0.92, 0.92, 0.90), "box": (0.75, 0.60, 0.38), "lamp": (0.95, 0.88, 0.60),
    "otherfurniture": (0.30, 0.30, 0.34), "otherprop": (0.85, 0.20, 0.20),
}  # fmt: skip

#: Procedural texture per class (see ``_texture``).
CLASS_TEXTURES: dict[str, str] = {
    "wall": "plaster", "floor": "floor", "cabinet": "grain", "bed": "fabric", "sofa": "fabric",
    "table": "grain", "door": "grain", "window": "plain", "picture": "picture",
    "ceiling": "plaster", "box": "cardboard", "lamp": "plain", "otherfurniture": "plain",
    "otherprop": "plain",
}  # fmt: skip

FOCAL_PER_WIDTH = 518.86 / 640.0  # NYUD Kinect fx / image width
DEPTH_EDGE_REL = 0.05  # relative depth jump between neighbours that makes an edge
_EPS = 1e-6


@dataclass
class _Hits:
    """Nearest hit per ray so far: distance t (z-depth), world normal, object index."""

    t: np.ndarray
    normal: np.ndarray
    obj: np.ndarray

    def update(self, idx: np.ndarray, t: np.ndarray, normal: np.ndarray, obj: int) -> None:
        """Rays ``idx`` hit object ``obj`` at ``t`` with ``normal``: keep the nearer hits."""
        closer = t < self.t[idx]
        rows = idx[closer]
        self.t[rows] = t[closer]
        self.normal[rows] = normal[closer]
        self.obj[rows] = obj


@dataclass
class _Object:
    """A solid: 'box' (centre, half sizes, yaw about y), 'sphere' or 'cylinder' (vertical)."""

    kind: str
    cls: str
    centre: np.ndarray
    size: np.ndarray  # box: half extents (x, y, z); sphere: (r,); cylinder: (r, half height)
    yaw: float = 0.0
    colour: np.ndarray = field(default_factory=lambda: np.ones(3))
    tex_seed: float = 0.0

    def __post_init__(self) -> None:  # float32 throughout: half the memory traffic
        self.centre = np.asarray(self.centre, dtype=np.float32)
        self.size = np.asarray(self.size, dtype=np.float32)
        self.colour = np.asarray(self.colour, dtype=np.float32)
        self.yaw = float(self.yaw)


# ----------------------------------------------------------------------------- geometry
def _rot_y(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=np.float32)


def _intersect_box(o: np.ndarray, d: np.ndarray, ob: _Object) -> tuple[np.ndarray, np.ndarray]:
    """Ray/oriented-box entry distance (inf when missed) and outward world normal."""
    rot = _rot_y(ob.yaw)  # local -> world
    lo = (o - ob.centre) @ rot  # world -> local (rot is orthonormal)
    ld = d @ rot
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(ld) < _EPS, _EPS, ld)
        t1 = (-ob.size - lo) * inv
        t2 = (ob.size - lo) * inv
    tnear_axes = np.minimum(t1, t2)
    tnear = tnear_axes.max(axis=-1)
    tfar = np.maximum(t1, t2).min(axis=-1)
    hit = (tfar >= tnear) & (tnear > _EPS)
    t = np.where(hit, tnear, np.inf)
    axis = tnear_axes.argmax(axis=-1)
    n_local = np.zeros(ld.shape if ld.ndim == 2 else (t.shape[0], 3))
    ld_b = np.broadcast_to(ld, n_local.shape)
    rows = np.arange(n_local.shape[0])
    n_local[rows, axis] = -np.sign(ld_b[rows, axis])
    return t, n_local @ rot.T


def _intersect_sphere(o: np.ndarray, d: np.ndarray, ob: _Object) -> tuple[np.ndarray, np.ndarray]:
    oc = o - ob.centre
    a = np.einsum("ij,ij->i", d, d)
    b = 2.0 * np.einsum("ij,ij->i", np.broadcast_to(oc, d.shape), d)
    c = np.einsum("ij,ij->i", np.broadcast_to(oc, d.shape), np.broadcast_to(oc, d.shape))
    c = c - ob.size[0] ** 2
    disc = b * b - 4 * a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t = (-b - sq) / (2 * a)
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    p = o + d * np.where(np.isfinite(t), t, 0.0)[:, None]
    return t, (p - ob.centre) / ob.size[0]


def _intersect_cylinder(o: np.ndarray, d: np.ndarray, ob: _Object) -> tuple[np.ndarray, np.ndarray]:
    """Vertical capped cylinder: side surface and the two caps."""
    r, hh = ob.size
    oc = np.broadcast_to(o - ob.centre, d.shape)
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (oc[:, 0] * d[:, 0] + oc[:, 2] * d[:, 2])
    c = oc[:, 0] ** 2 + oc[:, 2] ** 2 - r * r
    disc = b * b - 4 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * np.maximum(a, _EPS))
    y_side = oc[:, 1] + t_side * d[:, 1]
    t_side = np.where((disc >= 0) & (t_side > _EPS) & (np.abs(y_side) <= hh), t_side, np.inf)
    # caps: the plane facing the ray origin
    cap_y = np.where(oc[:, 1] > 0, hh, -hh)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (cap_y - oc[:, 1]) / np.where(np.abs(d[:, 1]) < _EPS, _EPS, d[:, 1])
    px = oc[:, 0] + t_cap * d[:, 0]
    pz = oc[:, 2] + t_cap * d[:, 2]
    t_cap = np.where((t_cap > _EPS) & (px * px + pz * pz <= r * r), t_cap, np.inf)
    use_cap = t_cap < t_side
    t = np.where(use_cap, t_cap, t_side)
    p = oc + d * np.where(np.isfinite(t), t, 0.0)[:, None]
    n = np.stack([p[:, 0] / r, np.zeros_like(t), p[:, 2] / r], axis=-1)
    n[use_cap] = 0.0
    n[use_cap, 1] = np.sign(cap_y[use_cap])
    return t, n


_INTERSECT = {"box": _intersect_box, "sphere": _intersect_sphere, "cylinder": _intersect_cylinder}


def _bounding_radius(ob: _Object) -> float:
    if ob.kind == "box":
        return float(np.linalg.norm(ob.size))
    if ob.kind == "cylinder":
        return float(np.hypot(*ob.size))
    return float(ob.size[0])


def _intersect(
    o: np.ndarray, d: np.ndarray, ob: _Object, dd: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersect rays ``o + t d`` (``o`` (3,) or (N, 3), ``d`` (N, 3)) with ``ob``.

    Rays whose line misses the object's bounding sphere are culled first, so the exact
    test runs only on the few rays near the object.

    Returns:
        ``idx`` (M,) indices of the rays tested, their hit distances ``t`` (M,)
        (inf = miss) and outward world normals (M, 3).
    """
    radius = 1.01 * _bounding_radius(ob) + 1e-3  # margin for float32 cancellation
    oc = ob.centre - o
    if dd is None:
        dd = np.einsum("ij,ij->i", d, d)
    if o.ndim == 1:
        tca = d @ oc
        oc2 = float(oc @ oc)
    else:
        tca = np.einsum("ij,ij->i", d, oc)
        oc2 = np.einsum("ij,ij->i", oc, oc)
    near = (oc2 - tca * tca / dd <= radius * radius) & ((tca > 0) | (oc2 <= radius * radius))
    idx = np.flatnonzero(near)
    if not idx.size:
        return idx, np.zeros(0, np.float32), np.zeros((0, 3), np.float32)
    t, n = _INTERSECT[ob.kind](o if o.ndim == 1 else o[idx], d[idx], ob)
    return idx, t, n


# ----------------------------------------------------------------------------- scene
@dataclass
class _Decal:
    """A flat rectangle on a wall (door, window, picture): wall id, u and v ranges in m.

    Walls: 0 is x = 0, 1 is x = W (u = z); 2 is z = 0, 3 is z = D (u = x); v = height.
    """

    cls: str
    wall: int
    u: tuple[float, float]
    v: tuple[float, float]
    colour: np.ndarray


@dataclass
class _Scene:
    room: np.ndarray  # (3,): x in [0, W], y in [0, H] (up), z in [0, D]
    objects: list[_Object]
    decals: list[_Decal]
    light: np.ndarray
    light_colour: np.ndarray
    ambient: float
    floor_pattern: str
    surface_colours: np.ndarray  # (6, 3): floor, ceiling, walls 0..3


class _Placer:
    """Rejection sampling of non-overlapping floor footprints (circles in x-z)."""

    def __init__(self, rng: np.random.Generator, room: np.ndarray, cam: np.ndarray) -> None:
        self.rng, self.room = rng, room
        self.footprints: list[tuple[float, float, float]] = [(cam[0], cam[2], 0.6)]

    def _free(self, x: float, z: float, r: float) -> bool:
        return all((x - fx) ** 2 + (z - fz) ** 2 > (r + fr) ** 2 for fx, fz, fr in self.footprints)

    def against_wall(self, hx: float, hz: float) -> tuple[float, float, float, float] | None:
        """Object with local x along a wall, back (local z side ``s``) to it.

        Returns (x, z, yaw, s) or None when no free spot was found."""
        r = float(np.hypot(hx, hz))
        for _ in range(20):
            wall = int(self.rng.integers(4))
            length = self.room[2] if wall < 2 else self.room[0]
            if length < 2 * hx + 0.1:
                continue
            along = self.rng.uniform(hx + 0.05, length - hx - 0.05)
            off = hz + 0.02
            x, z, yaw, s = (
                (off, along, np.pi / 2, -1.0),
                (self.room[0] - off, along, np.pi / 2, 1.0),
                (along, off, 0.0, -1.0),
                (along, self.room[2] - off, 0.0, 1.0),
            )[wall]
            if self._free(x, z, r):
                self.footprints.append((x, z, r))
                return x, z, yaw, s
        return None

    def free_standing(self, r: float) -> tuple[float, float, float] | None:
        """Object anywhere on the floor: (x, z, yaw) or None."""
        for _ in range(20):
            x = self.rng.uniform(r + 0.05, self.room[0] - r - 0.05)
            z = self.rng.uniform(r + 0.05, self.room[2] - r - 0.05)
            if self._free(x, z, r):
                self.footprints.append((x, z, r))
                return x, z, float(self.rng.uniform(0, np.pi))
        return None


def _sample_scene(rng: np.random.Generator, room: np.ndarray, cam: np.ndarray) -> _Scene:
    """Random furniture, decals and light for a room, keeping clear of the camera."""

    def colour(cls: str) -> np.ndarray:
        return np.clip(np.asarray(CLASS_COLOURS[cls]) * rng.uniform(0.7, 1.25, 3), 0.02, 1.0)

    decals = []
    for cls, n_max in (("door", 1), ("window", 1), ("picture", 2)):
        for _ in range(int(rng.integers(0, n_max + 1))):
            wall = int(rng.integers(4))
            length = room[2] if wall < 2 else room[0]
            if cls == "door":
                w, v0, v1 = rng.uniform(0.8, 1.0), 0.0, rng.uniform(1.9, 2.1)
            elif cls == "window":
                w, v0 = rng.uniform(0.8, 1.6), rng.uniform(0.8, 1.0)
                v1 = min(v0 + rng.uniform(0.9, 1.3), room[1] - 0.2)
            else:
                w, v0 = rng.uniform(0.4, 1.0), rng.uniform(1.2, 1.5)
                v1 = v0 + rng.uniform(0.3, 0.7)
            u0 = rng.uniform(0.2, max(0.3, length - w - 0.2))
            decals.append(_Decal(cls, wall, (u0, u0 + w), (v0, v1), colour(cls)))

    objects: list[_Object] = []
    place = _Placer(rng, room, cam)

    def add_box(cls, x, y0, z, hx, hz, height, yaw, col, tex) -> None:
        centre = np.array([x, y0 + height / 2, z])
        objects.append(_Object("box", cls, centre, np.array([hx, height / 2, hz]), yaw, col, tex))

    kinds = ("bed", "sofa", "cabinet", "table", "box", "stool", "lamp", "ball")
    for kind in rng.choice(kinds, size=int(rng.integers(3, 8))):
        tex = float(rng.uniform(0, 100))
        if kind in ("bed", "sofa", "cabinet"):
            hx, hz, h = {
                "bed": (rng.uniform(0.7, 1.0), rng.uniform(0.95, 1.05), rng.uniform(0.4, 0.6)),
                "sofa": (rng.uniform(0.8, 1.1), rng.uniform(0.4, 0.5), rng.uniform(0.4, 0.5)),
                "cabinet": (rng.uniform(0.25, 0.6), rng.uniform(0.2, 0.3), rng.uniform(0.8, 2.0)),
            }[kind]
            spot = place.against_wall(hx, hz)
            if spot is None:
                continue
            x, z, yaw, s = spot
            col = colour(kind)
            add_box(kind, x, 0.0, z, hx, hz, h, yaw, col, tex)
            if kind == "sofa":  # back rest on the wall side
                back = _rot_y(yaw) @ np.array([0.0, 0.0, s * hz * 0.75])
                add_box(
                    kind,
                    x + back[0],
                    0.0,
                    z + back[2],
                    hx,
                    hz * 0.25,
                    rng.uniform(0.8, 0.95),
                    yaw,
                    col,
                    tex,
                )
        elif kind == "table":
            hx, hz, h = rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.5), rng.uniform(0.7, 0.8)
            spot = place.free_standing(float(np.hypot(hx, hz)))
            if spot is None:
                continue
            x, z, yaw = spot
            col = colour("table")
            add_box("table", x, h - 0.05, z, hx, hz, 0.05, yaw, col, tex)
            for sx in (-1, 1):
                for sz in (-1, 1):
                    leg = _rot_y(yaw) @ np.array([sx * (hx - 0.05), 0.0, sz * (hz - 0.05)])
                    add_box(
                        "table", x + leg[0], 0.0, z + leg[2], 0.03, 0.03, h - 0.05, yaw, col, tex
                    )
            if rng.uniform() < 0.5:  # a ball on the table
                r = rng.uniform(0.08, 0.15)
                centre = np.array([x, h + r, z])
                objects.append(
                    _Object(
                        "sphere", "otherprop", centre, np.array([r]), 0.0, colour("otherprop"), tex
                    )
                )
        elif kind == "box":
            s = rng.uniform(0.15, 0.3)
            spot = place.free_standing(s * 1.5)
            if spot is not None:
                add_box(
                    "box",
                    spot[0],
                    0.0,
                    spot[1],
                    s,
                    s * rng.uniform(0.7, 1.3),
                    2 * s * rng.uniform(0.6, 1.2),
                    spot[2],
                    colour("box"),
                    tex,
                )
        elif kind == "stool":
            r, hh = rng.uniform(0.18, 0.3), rng.uniform(0.2, 0.35)
            spot = place.free_standing(r)
            if spot is not None:
                centre = np.array([spot[0], hh, spot[1]])
                objects.append(
                    _Object(
                        "cylinder",
                        "otherfurniture",
                        centre,
                        np.array([r, hh]),
                        0.0,
                        colour("otherfurniture"),
                        tex,
                    )
                )
        elif kind == "lamp":  # a pole and a shade
            spot = place.free_standing(0.25)
            if spot is not None:
                pole_h, col = rng.uniform(1.1, 1.5), colour("lamp")
                objects.append(
                    _Object(
                        "cylinder",
                        "lamp",
                        np.array([spot[0], pole_h / 2, spot[1]]),
                        np.array([0.025, pole_h / 2]),
                        0.0,
                        col * 0.4,
                        tex,
                    )
                )
                objects.append(
                    _Object(
                        "cylinder",
                        "lamp",
                        np.array([spot[0], pole_h + 0.15, spot[1]]),
                        np.array([rng.uniform(0.15, 0.22), 0.15]),
                        0.0,
                        col,
                        tex,
                    )
                )
        else:  # a ball on the floor
            r = rng.uniform(0.1, 0.25)
            spot = place.free_standing(r)
            if spot is not None:
                objects.append(
                    _Object(
                        "sphere",
                        "otherprop",
                        np.array([spot[0], r, spot[1]]),
                        np.array([r]),
                        0.0,
                        colour("otherprop"),
                        tex,
                    )
                )
    wall = colour("wall")
    surfaces = np.stack([colour("floor"), colour("ceiling")] + [wall] * 4)
    return _Scene(
        room=room,
        objects=objects,
        decals=decals,
        light=np.array(
            [rng.uniform(0.3, 0.7) * room[0], room[1] - 0.1, rng.uniform(0.3, 0.7) * room[2]],
            dtype=np.float32,
        ),
        light_colour=np.array(
            [1.0, rng.uniform(0.9, 1.0), rng.uniform(0.75, 0.95)], dtype=np.float32
        ),
        ambient=float(rng.uniform(0.25, 0.4)),
        floor_pattern=str(rng.choice(["planks", "tiles"])),
        surface_colours=surfaces.astype(np.float32),
    )


# ----------------------------------------------------------------------------- shading
def _hash(x: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer cell."""
    v = np.sin(x * 12.9898 + 78.233) * 43758.5453
    return v - np.floor(v)


def _texture(pattern: str, p: np.ndarray, phase: float, floor_pattern: str) -> np.ndarray:
    """Multiplicative texture (N,) or (N, 3) for world points ``p`` (N, 3)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if pattern == "floor" and floor_pattern == "planks":
        plank = np.floor(z / 0.18)
        frac = z / 0.18 - plank
        tex = 0.8 + 0.35 * _hash(plank + phase) + 0.06 * np.sin(35 * x + 7 * plank)
        return np.where(frac < 0.05, 0.55, tex)
    if pattern == "floor":  # tiles
        cell = np.floor(x / 0.5) + np.floor(z / 0.5)
        grout = (np.mod(x, 0.5) < 0.02) | (np.mod(z, 0.5) < 0.02)
        return np.where(grout, 0.5, np.where(np.mod(cell, 2) == 0, 1.0, 0.78))
    if pattern == "plaster":
        return 1.0 + 0.04 * np.sin(3 * x + phase) * np.sin(2.5 * z + 1.3 * y)
    if pattern == "grain":
        return 1.0 + 0.12 * np.sin(25 * (x + z) + 4 * np.sin(3 * y + phase))
    if pattern == "fabric":
        return 1.0 + 0.08 * np.sin(60 * (x - z)) * np.sin(60 * y) + 0.05 * np.sin(9 * y + phase)
    if pattern == "cardboard":
        return 1.0 + 0.06 * np.sin(18 * y + phase)
    if pattern == "picture":
        u = x + z
        return 0.6 + 0.4 * np.stack(
            [np.sin(7 * u + phase), np.sin(5 * y + 2 * phase), np.sin(9 * (u - y))], axis=-1
        )
    return np.ones_like(x)


def _camera(rng: np.random.Generator, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre (3,) and rotation (3, 3) whose rows are right, up, forward (world)."""
    cam = np.array(
        [rng.uniform(0.4, room[0] - 0.4), rng.uniform(1.0, 1.6), rng.uniform(0.4, room[2] - 0.4)]
    )
    to_centre = room / 2 - cam
    yaw = np.arctan2(to_centre[0], to_centre[2]) + rng.uniform(-0.5, 0.5)
    pitch = -np.deg2rad(rng.uniform(5, 25))
    fwd = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.cross([0.0, 1.0, 0.0], fwd)
    right /= np.linalg.norm(right)
    up = np.cross(fwd, right)
    return cam.astype(np.float32), np.stack([right, up, fwd]).astype(np.float32)


def render_scene(seed: int, index: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Render sample ``index`` of the data set with ``seed``.

    Returns:
        ``image`` uint8 (H, W, 3) RGB; ``depth`` float32 (H, W) z-depth in metres
        (0 = invalid); ``normals`` float32 (H, W, 3) camera-frame unit normals
        (x right, y up, z towards the camera; 0 = invalid); ``semseg`` uint8 (H, W)
        NYUv2-40 ids 1..40; ``edge`` uint8 (H, W) in {0, 1}.
    """
    rng = np.random.default_rng([seed, index])
    room = np.array(
        [rng.uniform(3.5, 6.5), rng.uniform(2.5, 3.1), rng.uniform(3.5, 6.5)], dtype=np.float32
    )
    cam, rot = _camera(rng, room)
    scene = _sample_scene(rng, room, cam)

    f = FOCAL_PER_WIDTH * width
    ys, xs = np.mgrid[0:height, 0:width]
    px = ((xs + 0.5 - width / 2) / f).ravel()
    py = ((ys + 0.5 - height / 2) / f).ravel()
    # camera-frame ray (x right, y up, forward 1) -> world; forward component 1 => t = z-depth
    d = np.stack([px, -py, np.ones_like(px)], axis=-1).astype(np.float32) @ rot
    dd = np.einsum("ij,ij->i", d, d)
    n_pix = d.shape[0]

    # room interior: exit distance through the nearest wall / floor / ceiling
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(d > _EPS, (room - cam) / d, np.where(d < -_EPS, -cam / d, np.inf))
    axis = t_axes.argmin(axis=-1)
    rows = np.arange(n_pix)
    hi_side = d[rows, axis] > 0
    normal = np.zeros((n_pix, 3), dtype=np.float32)
    normal[rows, axis] = -np.sign(d[rows, axis])
    # surface index: 0 floor, 1 ceiling, 2 + wall (0: x=0, 1: x=W, 2: z=0, 3: z=D)
    surface = np.where(axis == 1, hi_side.astype(int), 2 + np.where(axis == 0, 0, 2) + hi_side)
    hits = _Hits(t=t_axes[rows, axis], normal=normal, obj=surface)
    for k, ob in enumerate(scene.objects):
        hits.update(*_intersect(cam, d, ob, dd), obj=6 + k)

    p = cam + d * hits.t[:, None]
    n_world = hits.normal / np.linalg.norm(hits.normal, axis=-1, keepdims=True)

    surface_cls = ["floor", "ceiling", "wall", "wall", "wall", "wall"]
    classes = surface_cls + [ob.cls for ob in scene.objects]
    label_of = np.array([CLASS_IDS[c] for c in classes], dtype=np.uint8)
    labels = label_of[hits.obj]
    colour_table = np.concatenate(
        [scene.surface_colours] + [ob.colour[None] for ob in scene.objects]
    ).astype(np.float32)
    albedo = colour_table[hits.obj]
    tex = np.ones((n_pix, 3), dtype=np.float32)
    patterns = [CLASS_TEXTURES[c] for c in classes]
    phases = [0.0] * 6 + [ob.tex_seed for ob in scene.objects]
    for k in np.unique(hits.obj):
        m = hits.obj == k
        t_k = _texture(patterns[k], p[m], phases[k], scene.floor_pattern)
        tex[m] = t_k[:, None] if t_k.ndim == 1 else t_k

    # decals on walls (flush: change label and colour only)
    window = np.zeros(n_pix, dtype=bool)
    for dec in scene.decals:
        u = p[:, 2] if dec.wall < 2 else p[:, 0]
        m = (hits.obj == 2 + dec.wall) & (u >= dec.u[0]) & (u <= dec.u[1])
        m &= (p[:, 1] >= dec.v[0]) & (p[:, 1] <= dec.v[1])
        labels[m] = CLASS_IDS[dec.cls]
        albedo[m] = dec.colour
        t_k = _texture(CLASS_TEXTURES[dec.cls], p[m], 1.0, scene.floor_pattern)
        tex[m] = t_k[:, None] if t_k.ndim == 1 else t_k
        if dec.cls == "window":
            window |= m
        else:
            window &= ~m

    # Lambert + ambient with hard shadows from the objects
    to_light = scene.light - p
    dist = np.linalg.norm(to_light, axis=-1)
    ndl = np.maximum(np.einsum("ij,ij->i", n_world, to_light / dist[:, None]), 0.0)
    lit = ndl > 0
    # shadow rays cast from the light (one origin: cheap culling); t = 1 at the point
    from_light = p[lit] - scene.light
    fl2 = np.einsum("ij,ij->i", from_light, from_light)
    blocked = np.zeros(int(lit.sum()), dtype=bool)
    for ob in scene.objects:
        idx, t, _ = _intersect(scene.light, from_light, ob, fl2)
        blocked[idx] |= t < 1.0 - 1e-3
    shade = np.full(n_pix, scene.ambient, dtype=np.float32)
    shade[lit] += 2.2 * ndl[lit] * ~blocked / (1.0 + 0.15 * dist[lit] ** 2)
    rgb = albedo * tex * shade[:, None] * scene.light_colour
    rgb[window] = albedo[window] * tex[window] * 1.1  # daylight through the glass
    rgb = rgb + 0.012 * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = (np.clip(rgb, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)

    depth = hits.t.astype(np.float32)
    normals = (n_world @ rot.T).astype(np.float32)  # world -> (right, up, forward)
    normals[:, 2] *= -1  # z towards the camera
    depth[window] = 0.0
    normals[window] = 0.0

    shape = (height, width)
    depth, labels = depth.reshape(shape), labels.reshape(shape)
    return dict(
        image=image.reshape(height, width, 3),
        depth=depth,
        normals=normals.reshape(height, width, 3),
        semseg=labels,
        edge=(label_boundaries(labels) | depth_discontinuities(depth)).astype(np.uint8),
    )


def depth_discontinuities(depth: np.ndarray, rel: float = DEPTH_EDGE_REL) -> np.ndarray:
    """(H, W) bool: the depth to the right or below jumps by more than ``rel`` (relative to
    the nearer of the two); pixel pairs with an invalid (0) depth are skipped."""
    out = np.zeros(depth.shape, dtype=bool)
    for a, b, sl in (
        (depth[:, :-1], depth[:, 1:], (slice(None), slice(None, -1))),
        (depth[:-1, :], depth[1:, :], (slice(None, -1), slice(None))),
    ):
        valid = (a > 0) & (b > 0)
        near = np.where(valid, np.minimum(a, b), 1.0)
        out[sl] |= valid & (np.abs(a - b) > rel * near)
    return out


# ----------------------------------------------------------------------------- writing
def _write_sample(args: tuple[str, int, str, int, int]) -> str:
    """Render one sample and write its five files into ``root``; returns its id."""
    root, seed, sample_id, height, width = args
    index = int(sample_id)
    s = render_scene(seed, index, height, width)
    Image.fromarray(s["image"]).save(osp.join(root, "images", sample_id + ".jpg"), quality=92)
    Image.fromarray(s["semseg"]).save(osp.join(root, "segmentation", sample_id + ".png"))
    np.save(osp.join(root, "depth", sample_id + ".npy"), s["depth"])
    np.save(osp.join(root, "normals", sample_id + ".npy"), s["normals"])
    np.save(osp.join(root, "edge", sample_id + ".npy"), s["edge"])
    return sample_id


def generate(
    out: str,
    num_train: int,
    num_val: int,
    size: tuple[int, int] = (240, 320),
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> float:
    """Render ``num_train + num_val`` scenes into ``out`` in the NYUD-MT layout.

    Ids are ``000000`` ... (train first, then val). Files are written into a temporary
    sibling folder that is renamed to ``out`` at the end, so ``out`` is either complete
    or absent. Returns the wall time in seconds.

    Raises:
        ValueError: bad counts or size; FileExistsError: ``out`` exists and not
        ``overwrite``.
    """
    height, width = (int(v) for v in size)
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    if height < 8 or width < 8:
        raise ValueError(f"image size {size} too small (need H, W >= 8)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = osp.abspath(out)
    if osp.exists(out) and not overwrite:
        raise FileExistsError(f"output folder {out!r} exists; pass overwrite=True / --overwrite")
    parent = osp.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = osp.join(parent, f".{osp.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
            os.makedirs(osp.join(tmp, sub))
        ids = [f"{i:06d}" for i in range(num_train + num_val)]
        jobs = [(tmp, seed, i, height, width) for i in ids]
        done = 0
        if workers == 1:
            results = map(_write_sample, jobs)
            pool = None
        else:
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap_unordered(_write_sample, jobs, chunksize=4)
        try:
            for _ in results:
                done += 1
                if progress and (done % 25 == 0 or done == len(jobs)):
                    rate = done / (time.perf_counter() - start)
                    print(
                        f"[make_synthetic_nyud] {done}/{len(jobs)} images ({rate:.1f} img/s)",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        with open(osp.join(tmp, "gt_sets", "train.txt"), "w") as fh:
            fh.write("".join(i + "\n" for i in ids[:num_train]))
        with open(osp.join(tmp, "gt_sets", "val.txt"), "w") as fh:
            fh.write("".join(i + "\n" for i in ids[num_train:]))
        meta = dict(
            generator="mmseg_m3vit.datasets.synthetic_nyud",
            seed=seed,
            size=[height, width],
            num_train=num_train,
            num_val=num_val,
            intrinsics=dict(
                fx=FOCAL_PER_WIDTH * width, fy=FOCAL_PER_WIDTH * width, cx=width / 2, cy=height / 2
            ),
            normals_frame="camera: x right, y up, z towards the camera",
            depth="z-depth in metres, 0 = invalid",
            classes={name: CLASS_IDS[name] for name in sorted(CLASS_IDS, key=CLASS_IDS.get)},
        )
        with open(osp.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=2)
        if osp.exists(out):  # overwrite: move the old one aside, then replace
            old = tmp + ".old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - start
