"""Binary glTF 2.0 written from arrays: plain float, or quantised with ``KHR_mesh_quantization``; vertex-coloured,
or textured (a baked base-colour texture, no vertex colours).

Quantised (the ``web`` profile): positions as normalised int16 with the node's translation and uniform scale
undoing it (~8 µm steps on a 0.5 m object), normals as normalised int8, colours as normalised uint16 *linear*
RGB (glTF's COLOR_0 is linear; the photo's colours are sRGB), indices uint16 when they fit. That is 16 bytes a
vertex instead of 30, and three.js (so ``<model-viewer>``) reads it natively: no decoder, no CDN. Meshopt and
Draco compress further but ``<model-viewer>`` fetches their decoders from a CDN by default, so they are not used.
Plain (``ar``, ``raw``, ``store``): float positions and normals, for viewers and stores that take no extensions.
Textured (``store``): positions, normals and ``TEXCOORD_0`` (floats) and a metallic-roughness material whose base
colour is the baked PNG (``texture.Textured``), one material per mesh. Every material is non-metallic and
double-sided (glTF's default material is fully metallic).
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3d_pipeline.export.mesh import ExportMesh, linear_to_srgb, srgb_to_linear
from sam3d_pipeline.export.texture import Textured, png_bytes

ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
BYTE, UNSIGNED_BYTE, SHORT, UNSIGNED_SHORT, UNSIGNED_INT, FLOAT = 5120, 5121, 5122, 5123, 5125, 5126
_DTYPES = {BYTE: np.int8, UNSIGNED_BYTE: np.uint8, SHORT: np.int16, UNSIGNED_SHORT: np.uint16,
           UNSIGNED_INT: np.uint32, FLOAT: np.float32}
QUANTIZATION = "KHR_mesh_quantization"
ROUGHNESS = 0.85  # matte: photographed objects carry their lighting in their colours
LINEAR, LINEAR_MIPMAP_LINEAR, CLAMP_TO_EDGE = 9729, 9987, 33071


@dataclass
class Part:
    """One mesh of a GLB and where its node puts it (``translation``, metres); with ``textured`` (the same mesh
    cut along its UV seams, with its baked texture) the GLB carries that instead of vertex colours."""

    name: str
    mesh: ExportMesh
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    textured: Textured | None = None


class _Builder:
    def __init__(self) -> None:
        self.blob = bytearray()
        self.views: list[dict[str, Any]] = []
        self.accessors: list[dict[str, Any]] = []

    def add_bytes(self, data: bytes) -> int:
        """Append ``data`` as one buffer view without a target (an image); returns the view index."""
        while len(self.blob) % 4:
            self.blob.append(0)
        self.views.append({"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)})
        self.blob += data
        return len(self.views) - 1

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


def write_glb(parts: list[Part], *, quantize: bool, extras: dict[str, Any] | None = None,
              roughness: float = ROUGHNESS) -> bytes:
    """GLB bytes holding ``parts``, one node and mesh each, under one scene.

    Args:
        parts: meshes (vertices in metres, Y up) and their node translations; textured or vertex-coloured.
        quantize: write ``KHR_mesh_quantization`` attributes (see module docstring) instead of floats.
        extras: JSON-serialisable values put in ``scenes[0].extras`` (beside ``generator: sam3d-pipeline``).
        roughness: the materials' ``roughnessFactor`` (metallic is 0).

    Raises:
        ValueError: no parts, a part without triangles, or a textured part with ``quantize``.
    """
    if not parts:
        raise ValueError("a GLB needs at least one mesh")
    b = _Builder()
    nodes: list[dict[str, Any]] = []
    meshes: list[dict[str, Any]] = []
    materials: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    root_children = []
    for part in parts:
        m = part.mesh
        if m.triangles == 0:
            raise ValueError(f"mesh {part.name!r} has no triangles")
        node: dict[str, Any] = {"name": part.name, "mesh": len(meshes)}
        translation = np.asarray(part.translation, dtype=np.float64)
        if part.textured is not None:
            if quantize:
                raise ValueError("textured GLB parts are written as floats: quantize must be False")
            t = part.textured
            attributes = {"POSITION": b.add(t.vertices, FLOAT, "VEC3", target=ARRAY_BUFFER, minmax=True),
                          "NORMAL": b.add(t.normals, FLOAT, "VEC3", target=ARRAY_BUFFER),
                          "TEXCOORD_0": b.add(np.stack([t.uv[:, 0], 1.0 - t.uv[:, 1]], 1), FLOAT, "VEC2",
                                              target=ARRAY_BUFFER)}
            faces, n_vertices = t.faces, len(t.vertices)
            images.append({"bufferView": b.add_bytes(png_bytes(t.image)), "mimeType": "image/png"})
            materials.append(_material(f"{part.name}-baked", roughness, texture=len(images) - 1))
        else:
            normals = m.vertex_normals()
            colours = np.round(srgb_to_linear(m.colours) * 65535).astype(np.uint16)
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
                translation = origin + translation
                node["scale"] = [half, half, half]
            else:
                pos = b.add(m.vertices, FLOAT, "VEC3", target=ARRAY_BUFFER, minmax=True)
                nrm = b.add(normals, FLOAT, "VEC3", target=ARRAY_BUFFER)
            col = b.add(colours, UNSIGNED_SHORT, "VEC3", target=ARRAY_BUFFER, normalized=True)
            attributes = {"POSITION": pos, "NORMAL": nrm, "COLOR_0": col}
            faces, n_vertices = m.faces, len(m.vertices)
            materials.append(_material("vertex-colour", roughness))
        if quantize or np.any(translation):
            node["translation"] = [float(v) for v in translation]
        index_type = UNSIGNED_SHORT if n_vertices < 65535 else UNSIGNED_INT
        idx = b.add(faces.reshape(-1), index_type, "SCALAR", target=ELEMENT_ARRAY_BUFFER)
        meshes.append({"name": part.name, "primitives": [{
            "attributes": attributes, "indices": idx, "material": len(materials) - 1, "mode": 4}]})
        root_children.append(len(nodes))
        nodes.append(node)
    gltf: dict[str, Any] = {
        "asset": {"version": "2.0", "generator": "sam3d-pipeline"},
        "scene": 0,
        "scenes": [{"nodes": root_children, "extras": {"generator": "sam3d-pipeline", **(extras or {})}}],
        "nodes": nodes,
        "meshes": meshes,
        "materials": materials,
        "accessors": b.accessors,
        "bufferViews": b.views,
        "buffers": [{"byteLength": len(b.blob)}],
    }
    if images:
        gltf["images"] = images
        gltf["samplers"] = [{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR, "wrapS": CLAMP_TO_EDGE,
                             "wrapT": CLAMP_TO_EDGE}]
        gltf["textures"] = [{"sampler": 0, "source": i} for i in range(len(images))]
    if quantize:
        gltf["extensionsUsed"] = [QUANTIZATION]
        gltf["extensionsRequired"] = [QUANTIZATION]
    return _pack(gltf, bytes(b.blob))


def _material(name: str, roughness: float, texture: int | None = None) -> dict[str, Any]:
    pbr: dict[str, Any] = {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0, "roughnessFactor": roughness}
    if texture is not None:
        pbr["baseColorTexture"] = {"index": texture, "texCoord": 0}
    return {"name": name, "doubleSided": True, "pbrMetallicRoughness": pbr}


def _pack(gltf: dict[str, Any], blob: bytes) -> bytes:
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    blob += b"\0" * (-len(blob) % 4)
    total = 12 + 8 + len(text) + 8 + len(blob)
    return (struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(text), b"JSON") + text
            + struct.pack("<I4s", len(blob), b"BIN\0") + blob)


def unpack(data: bytes) -> tuple[dict[str, Any], bytes]:
    """``(JSON, binary chunk)`` of a GLB.

    Raises:
        ValueError: not a binary glTF 2.0 file.
    """
    if len(data) < 20:
        raise ValueError("not a binary glTF 2.0 file")
    magic, version, _ = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF" or version != 2:
        raise ValueError("not a binary glTF 2.0 file")
    json_len = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20:20 + json_len])
    return gltf, data[20 + json_len + 8:]


def image_bytes(gltf: dict[str, Any], blob: bytes, index: int) -> bytes:
    """The encoded bytes of ``images[index]`` stored in the GLB's binary chunk."""
    view = gltf["bufferViews"][gltf["images"][index]["bufferView"]]
    start = view.get("byteOffset", 0)
    return blob[start:start + view["byteLength"]]


def read_glb(data: bytes) -> tuple[dict[str, Any], list[ExportMesh]]:
    """The JSON and every mesh of a vertex-coloured GLB written by :func:`write_glb` (node transforms applied,
    sRGB colours). trimesh reads the textured ones (``look.textured_from_glb``) but not quantised positions.

    Reads what ``write_glb`` writes (one primitive per mesh, nodes under the scene root); used to check and
    compare exports.

    Raises:
        ValueError: not a GLB, or a mesh without vertex colours.
    """
    gltf, blob = unpack(data)

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
        if "COLOR_0" not in prim["attributes"]:
            raise ValueError(f"mesh {node.get('name')!r} has no vertex colours (a textured GLB: read it with trimesh)")
        pos = accessor(prim["attributes"]["POSITION"])
        pos = pos * np.asarray(node.get("scale", [1, 1, 1])) + np.asarray(node.get("translation", [0, 0, 0]))
        colours = linear_to_srgb(accessor(prim["attributes"]["COLOR_0"])[:, :3])
        faces = accessor(prim["indices"]).astype(np.int64).reshape(-1, 3)
        meshes.append(ExportMesh(vertices=pos, faces=faces, colours=colours))
    return gltf, meshes


def read_textured_glb(data: bytes) -> list[Textured]:
    """Every textured mesh of a GLB (node transforms applied), read with trimesh: positions, normals, texture
    coordinates (origin bottom-left) and the base colour texture; used to check and compare ``store`` exports.

    Raises:
        ValueError: not a GLB, or a mesh without a base colour texture.
    """
    import trimesh

    unpack(data)  # a clear error for what is not a GLB
    scene = trimesh.load(io.BytesIO(data), file_type="glb", process=False)
    if isinstance(scene, trimesh.Trimesh):
        scene = trimesh.Scene(scene)
    out = []
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        mesh = scene.geometry[name].copy()
        mesh.apply_transform(transform)
        texture = getattr(getattr(mesh.visual, "material", None), "baseColorTexture", None)
        if getattr(mesh.visual, "uv", None) is None or texture is None:
            raise ValueError(f"mesh {name!r} has no base colour texture")
        count = len(mesh.vertices)
        out.append(Textured(vertices=np.asarray(mesh.vertices, np.float64), faces=np.asarray(mesh.faces, np.int64),
                            normals=np.asarray(mesh.vertex_normals, np.float64),
                            uv=np.asarray(mesh.visual.uv, np.float32), image=np.asarray(texture.convert("RGB")),
                            source="glb", charts=0, source_vertex=np.arange(count)))
    return out
