import CPhatgooseKernels
import PhatgooseFormats
#if canImport(Glibc)
import Glibc
#endif

/// Memory that Phatgoose allocated itself (for example a transposed `lora_B`), 64-byte aligned.
///
/// # Thread safety
/// Written once by its creator before it is shared, then only read; freed in `deinit` when no reference remains.
/// That is why it is `@unchecked Sendable`.
public final class HeapBuffer: @unchecked Sendable {
    /// The first byte, 64-byte aligned.
    public let pointer: UnsafeMutableRawPointer
    /// The size in bytes, as requested.
    public let count: Int

    /// Allocates `byteCount` uninitialised bytes (at least one), 64-byte aligned.
    public init(byteCount: Int) {
        count = byteCount
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
    }

    deinit { pointer.deallocate() }
}

/// A read-only tensor of F32, F16 or BF16 values that lives in a file mapping or in a ``HeapBuffer``, which it keeps
/// alive.
///
/// # Thread safety
/// `@unchecked Sendable` because of the raw pointer: it points into memory that `owner` keeps alive and that no one
/// writes after the tensor is built (read-only mappings, or heap buffers filled before they are shared).
public struct WeightTensor: @unchecked Sendable {
    /// The element type (F32, F16 or BF16).
    public let dtype: DType
    /// Dimensions, outermost first.
    public let shape: [Int]
    /// Keeps the memory alive.
    public let owner: any AnyObject & Sendable
    /// The first byte; may be unaligned for tensors mapped from a safetensors file.
    public let pointer: UnsafeRawPointer

    /// Creates a tensor from its parts; `owner` must keep the memory at `pointer` alive.
    public init(dtype: DType, shape: [Int], owner: any AnyObject & Sendable, pointer: UnsafeRawPointer) {
        self.dtype = dtype
        self.shape = shape
        self.owner = owner
        self.pointer = pointer
    }

    /// A tensor viewed in place in a safetensors file.
    public init(_ view: TensorView) {
        self.init(dtype: view.info.dtype, shape: view.info.shape, owner: view.storage,
                  pointer: view.storage.bytes.baseAddress! + view.byteOffset)
    }

    /// Number of elements (the product of `shape`).
    public var elementCount: Int { shape.reduce(1, *) }
    /// Size of the data in bytes.
    public var byteCount: Int { elementCount * dtype.size }
    /// The data as raw bytes, valid while `owner` lives.
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: pointer, count: byteCount) }

    /// The kernels' dtype code.
    public var kernelDType: Int32 { dtype.kernelCode! }

    /// The values as F32.
    public func floats() -> [Float] {
        let count = elementCount
        return [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 { pg_convert_to_f32(pointer, kernelDType, buffer.baseAddress, count) }
            initialized = count
        }
    }

    /// True when both tensors have the same dtype, shape and bytes.
    public func isIdentical(to other: WeightTensor) -> Bool {
        dtype == other.dtype && shape == other.shape && memcmp(pointer, other.pointer, byteCount) == 0
    }
}
