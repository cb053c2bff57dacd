import PhatgooseFormats

/// Any bytes as a torch.save checkpoint: read or throw; an accepted checkpoint's 1-D and 2-D tensors that are no
/// larger than their storage (what the import requires) must gather in bounds, straight and transposed.
func fuzzTorchCheckpoint(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let storage = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size), path: "fuzz.pt")
    guard let checkpoint = try? TorchCheckpoint(storage: storage) else { return 0 }
    for (_, tensor) in checkpoint.tensors where tensor.shape.count == 1 || tensor.shape.count == 2 {
        guard tensor.elementCount <= tensor.storage.count, let bytes = try? checkpoint.bytes(of: tensor.storage) else { continue }
        var out: [UInt8] = []
        TorchCheckpoint.copyElements(of: tensor, from: bytes, into: &out)
        if tensor.shape.count == 2 { TorchCheckpoint.copyElements(of: tensor, from: bytes, transposed: true, into: &out) }
    }
    return 0
}
