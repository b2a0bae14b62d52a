"""Binary glTF 2.0 written from arrays: plain float, or quantised with ``KHR_mesh_quantization``.

Quantised (the ``web`` profile): positions as normalised int16 with the node's translation and uniform scale
undoing it (~8 µm steps on a 0.5 m object), normals as normalised int8, colours as normalised uint16 *linear*
RGB (glTF's COLOR_0 is linear; the photo's colours are sRGB), indices uint16 when they fit. That is 16 bytes a
vertex instead of 30, and three.js (so ``<model-viewer>``) reads it natively: no decoder, no CDN. Meshopt and
Draco compress further but ``<model-viewer>`` fetches their decoders from a CDN by default, so they are not used.
Plain (``ar``, ``raw``): float positions and normals, for viewers that take no extensions. Every mesh gets a
non-metallic, double-sided material (glTF's default material is fully metallic).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3d_pipeline.export.mesh import ExportMesh, linear_to_srgb, srgb_to_linear

ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
BYTE, UNSIGNED_BYTE, SHORT, UNSIGNED_SHORT, UNSIGNED_INT, FLOAT = 5120, 5121, 5122, 5123, 5125, 5126
_DTYPES = {BYTE: np.int8, UNSIGNED_BYTE: np.uint8, SHORT: np.int16, UNSIGNED_SHORT: np.uint16,
           UNSIGNED_INT: np.uint32, FLOAT: np.float32}
QUANTIZATION = "KHR_mesh_quantization"


@dataclass
class Part:
    """One mesh of a GLB and where its node puts it (``translation``, metres)."""

    name: str
    mesh: ExportMesh
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)


class _Builder:
    def __init__(self) -> None:
        self.blob = bytearray()
        self.views: list[dict[str, Any]] = []
        self.accessors: list[dict[str, Any]] = []

    def add(self, array: np.ndarray, component: int, kind: str, *, target: int, normalized: bool = False,
            minmax: bool = False) -> int:
        """Append ``array`` (rows padded to 4 bytes) as one buffer view + accessor; returns the accessor index."""
        array = np.ascontiguousarray(array, dtype=_DTYPES[component])
        rows = array.reshape(len(array), -1)
        row_bytes = rows.shape[1] * rows.itemsize
        stride = (row_bytes + 3) // 4 * 4
        if target == ARRAY_BUFFER and stride != row_bytes:
            padded = np.zeros((len(rows), stride), np.uint8)
            padded[:, :row_bytes] = rows.view(np.uint8).reshape(len(rows), row_bytes)
            data = padded.tobytes()
        else:
            data = rows.tobytes()
        while len(self.blob) % 4:
            self.blob.append(0)
        view: dict[str, Any] = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data), "target": target}
        if target == ARRAY_BUFFER:
            view["byteStride"] = stride
        self.blob += data
        self.views.append(view)
        accessor: dict[str, Any] = {"bufferView": len(self.views) - 1, "componentType": component,
                                    "count": int(len(rows) if kind != "SCALAR" else array.size), "type": kind}
        if normalized:
            accessor["normalized"] = True
        if minmax:
            accessor["min"] = [_num(v) for v in rows.min(0)]
            accessor["max"] = [_num(v) for v in rows.max(0)]
        self.accessors.append(accessor)
        return len(self.accessors) - 1


def _num(v: Any) -> int | float:
    return int(v) if np.issubdtype(type(v), np.integer) else float(v)


def write_glb(parts: list[Part], *, quantize: bool, extras: dict[str, Any] | None = None) -> bytes:
    """GLB bytes holding ``parts``, one node and mesh each, under one scene.

    Args:
        parts: meshes (vertices in metres, Y up) and their node translations.
        quantize: write ``KHR_mesh_quantization`` attributes (see module docstring) instead of floats.
        extras: JSON-serialisable values put in ``scenes[0].extras`` (beside ``generator: sam3d-pipeline``).

    Raises:
        ValueError: no parts, or a part without triangles.
    """
    if not parts:
        raise ValueError("a GLB needs at least one mesh")
    b = _Builder()
    nodes: list[dict[str, Any]] = []
    meshes: list[dict[str, Any]] = []
    root_children = []
    for part in parts:
        m = part.mesh
        if m.triangles == 0:
            raise ValueError(f"mesh {part.name!r} has no triangles")
        normals = m.vertex_normals()
        colours = np.round(srgb_to_linear(m.colours) * 65535).astype(np.uint16)
        node: dict[str, Any] = {"name": part.name, "mesh": len(meshes)}
        translation = np.asarray(part.translation, dtype=np.float64)
        if quantize:
            lo, hi = m.vertices.min(0), m.vertices.max(0)
            centre, half = (lo + hi) / 2, float(max((hi - lo).max() / 2, 1e-9))
            q = np.clip(np.round((m.vertices - centre) / half * 32767), -32767, 32767).astype(np.int16)
            pos = b.add(q, SHORT, "VEC3", target=ARRAY_BUFFER, normalized=True, minmax=True)
            nrm = b.add(np.clip(np.round(normals * 127), -127, 127), BYTE, "VEC3", target=ARRAY_BUFFER,
                        normalized=True)
            # Put the translation where the lowest quantised value lands exactly on the mesh's minimum, so an
            # asset resting on Y = 0 still does after dequantisation.
            origin = lo - q.min(0).astype(np.float64) * half / 32767
            node["translation"] = [float(v) for v in origin + translation]
            node["scale"] = [half, half, half]
        else:
            pos = b.add(m.vertices, FLOAT, "VEC3", target=ARRAY_BUFFER, minmax=True)
            nrm = b.add(normals, FLOAT, "VEC3", target=ARRAY_BUFFER)
            if np.any(translation):
                node["translation"] = [float(v) for v in translation]
        col = b.add(colours, UNSIGNED_SHORT, "VEC3", target=ARRAY_BUFFER, normalized=True)
        index_type = UNSIGNED_SHORT if len(m.vertices) < 65535 else UNSIGNED_INT
        idx = b.add(m.faces.reshape(-1), index_type, "SCALAR", target=ELEMENT_ARRAY_BUFFER)
        meshes.append({"name": part.name, "primitives": [{
            "attributes": {"POSITION": pos, "NORMAL": nrm, "COLOR_0": col}, "indices": idx, "material": 0,
            "mode": 4}]})
        root_children.append(len(nodes))
        nodes.append(node)
    gltf: dict[str, Any] = {
        "asset": {"version": "2.0", "generator": "sam3d-pipeline"},
        "scene": 0,
        "scenes": [{"nodes": root_children, "extras": {"generator": "sam3d-pipeline", **(extras or {})}}],
        "nodes": nodes,
        "meshes": meshes,
        "materials": [{"name": "vertex-colour", "doubleSided": True,
                       "pbrMetallicRoughness": {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0,
                                                "roughnessFactor": 0.85}}],
        "accessors": b.accessors,
        "bufferViews": b.views,
        "buffers": [{"byteLength": len(b.blob)}],
    }
    if quantize:
        gltf["extensionsUsed"] = [QUANTIZATION]
        gltf["extensionsRequired"] = [QUANTIZATION]
    return _pack(gltf, bytes(b.blob))


def _pack(gltf: dict[str, Any], blob: bytes) -> bytes:
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    blob += b"\0" * (-len(blob) % 4)
    total = 12 + 8 + len(text) + 8 + len(blob)
    return (struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(text), b"JSON") + text
            + struct.pack("<I4s", len(blob), b"BIN\0") + blob)


def read_glb(data: bytes) -> tuple[dict[str, Any], list[ExportMesh]]:
    """The JSON and every mesh of a GLB written by :func:`write_glb` (node transforms applied, sRGB colours).

    Reads what ``write_glb`` writes (one primitive per mesh, nodes under the scene root); used to check and
    compare exports.

    Raises:
        ValueError: not a GLB.
    """
    magic, version, _ = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF" or version != 2:
        raise ValueError("not a binary glTF 2.0 file")
    json_len = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20:20 + json_len])
    bin_start = 20 + json_len + 8
    blob = data[bin_start:]

    def accessor(i: int) -> np.ndarray:
        acc = gltf["accessors"][i]
        view = gltf["bufferViews"][acc["bufferView"]]
        dtype = np.dtype(_DTYPES[acc["componentType"]])
        width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc["type"]]
        stride = view.get("byteStride", width * dtype.itemsize)
        raw = np.frombuffer(blob, np.uint8, count=view["byteLength"], offset=view["byteOffset"])
        if width * dtype.itemsize == stride:
            out = raw.view(dtype).reshape(acc["count"], width)
        else:
            rows = np.lib.stride_tricks.as_strided(raw, (acc["count"], width * dtype.itemsize), (stride, 1))
            out = np.ascontiguousarray(rows).view(dtype).reshape(acc["count"], width)
        out = out.astype(np.float64)
        if acc.get("normalized"):
            out = np.maximum(out / float(np.iinfo(dtype).max), -1.0)
        return out

    meshes = []
    for node in gltf["nodes"]:
        prim = gltf["meshes"][node["mesh"]]["primitives"][0]
        pos = accessor(prim["attributes"]["POSITION"])
        pos = pos * np.asarray(node.get("scale", [1, 1, 1])) + np.asarray(node.get("translation", [0, 0, 0]))
        colours = linear_to_srgb(accessor(prim["attributes"]["COLOR_0"])[:, :3])
        faces = accessor(prim["indices"]).astype(np.int64).reshape(-1, 3)
        meshes.append(ExportMesh(vertices=pos, faces=faces, colours=colours))
    return gltf, meshes
