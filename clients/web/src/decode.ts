// Packed arrays (tensorwire.common.v1.Array) to Float32Array, as tensorwire/data/arrays.py
// documents them: inflate (DEFLATE = zlib format), un-shuffle bytes, read
// little-endian elements, dequantize uint8.
//
// Inflating uses fflate's synchronous zlib decoder: views are a few KiB, and
// the browser's DecompressionStream costs far more in stream and promise
// set-up per array than the inflating itself (measured: ~10 ms per array on a
// busy machine, against well under 1 ms here).
import { unzlibSync } from "fflate";
import { type Array as PackedArray, Codec, DType } from "./gen/tensorwire/common/v1/common_pb";

export interface Decoded {
  shape: number[];
  values: Float32Array;
}

const ITEM_SIZE: Record<number, number> = {
  [DType.DTYPE_F32]: 4,
  [DType.DTYPE_F16]: 2,
  [DType.DTYPE_U8]: 1,
  [DType.DTYPE_I32]: 4,
  [DType.DTYPE_U16]: 2,
};

function inflate(data: Uint8Array): Uint8Array {
  return unzlibSync(data);
}

function unshuffle(raw: Uint8Array, itemSize: number): Uint8Array {
  if (itemSize === 1) return raw;
  const n = raw.length / itemSize;
  const out = new Uint8Array(raw.length);
  for (let b = 0; b < itemSize; b++) {
    const base = b * n;
    for (let i = 0; i < n; i++) out[i * itemSize + b] = raw[base + i];
  }
  return out;
}

// IEEE 754 half -> float, through a 64K-entry table built on first use.
let halfTable: Float32Array | null = null;
function half(): Float32Array {
  if (halfTable) return halfTable;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const f = h & 0x3ff;
    t[h] = e === 0 ? s * 2 ** -14 * (f / 1024)
      : e === 31 ? (f ? NaN : s * Infinity)
      : s * 2 ** (e - 15) * (1 + f / 1024);
  }
  return (halfTable = t);
}

export function decodeArray(a: PackedArray): Decoded {
  const itemSize = ITEM_SIZE[a.dtype];
  if (!itemSize) throw new Error(`array ${a.name}: unsupported dtype ${a.dtype}`);
  let raw = a.codec === Codec.DEFLATE ? inflate(a.data) : a.data;
  if (a.codec === Codec.ZSTD) throw new Error(`array ${a.name}: zstd is not decodable here`);
  if (a.shuffled) raw = unshuffle(raw, itemSize);
  const n = raw.length / itemSize;
  const values = new Float32Array(n);
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  switch (a.dtype) {
    case DType.DTYPE_F32:
      for (let i = 0; i < n; i++) values[i] = view.getFloat32(i * 4, true);
      break;
    case DType.DTYPE_F16: {
      const t = half();
      for (let i = 0; i < n; i++) values[i] = t[view.getUint16(i * 2, true)];
      break;
    }
    case DType.DTYPE_U8: {
      const scale = a.scale || 1;
      const offset = a.scale ? a.offset : 0;
      for (let i = 0; i < n; i++) values[i] = offset + scale * raw[i];
      break;
    }
    case DType.DTYPE_I32:
      for (let i = 0; i < n; i++) values[i] = view.getInt32(i * 4, true);
      break;
    case DType.DTYPE_U16:
      for (let i = 0; i < n; i++) values[i] = view.getUint16(i * 2, true);
      break;
  }
  return { shape: [...a.shape], values };
}

/** Every array of a view, by name. */
export function decodeAll(arrays: PackedArray[]): Map<string, Decoded> {
  return new Map(arrays.map((a) => [a.name, decodeArray(a)]));
}
