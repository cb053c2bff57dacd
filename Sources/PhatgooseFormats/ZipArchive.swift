import CPhatgooseKernels

/// A zip archive read in place from a mapping, as `torch.save` writes them: stored (uncompressed) entries, ZIP64
/// records beyond 4 GiB. Nothing is decompressed or copied; an entry's bytes are a view into the mapping.
///
/// Checks: the end-of-central-directory record (and its ZIP64 form) is where the format puts it, every
/// central-directory record is whole and points inside the file, entry names are unique; when an entry is read,
/// its local header agrees with its central record (signature, name), its data lies inside the file, and
/// ``data(of:)`` compares the CRC-32 of the bytes it hands out with the recorded one. Encrypted and compressed
/// entries are refused when read. Local headers are read only for the entries used: touching one per entry would
/// fault in pages all over a large archive (the kernel maps neighbouring pages of each fault too).
public struct ZipArchive: Sendable {
    /// One entry of the central directory.
    public struct Entry: Sendable, Equatable {
        /// The entry's name, for example `best/data/0`.
        public let name: String
        /// Where the entry's local header starts in the file.
        public let localHeaderOffset: Int
        /// The recorded size of the entry's data as stored.
        public let compressedSize: Int
        /// The recorded CRC-32 of the uncompressed bytes.
        public let crc32: UInt32
        /// The compression method (0 = stored).
        public let method: UInt16
        /// The general-purpose flags (bit 0 = encrypted).
        public let flags: UInt16
        /// The recorded uncompressed size.
        public let uncompressedSize: Int
    }

    /// The mapping every entry's bytes point into.
    public let storage: MappedFile
    /// Entries in central-directory order.
    public let entries: [Entry]
    private let index: [String: Int]

    /// The archive's path.
    public var path: String { storage.path }

    /// Whether `bytes` start like a zip archive (a local file header).
    public static func hasZipSignature(_ bytes: UnsafeRawBufferPointer) -> Bool {
        bytes.count >= 4 && bytes.loadUnaligned(as: UInt32.self).littleEndian == 0x0403_4B50
    }

    /// Parses the central directory of the archive in `storage`.
    public init(storage: MappedFile) throws(FormatError) {
        self.storage = storage
        let bytes = storage.bytes
        let path = storage.path
        func failure(_ subject: String?, _ message: String) -> FormatError {
            FormatError(.zip, file: path, subject: subject, message)
        }
        func u16(_ offset: Int) -> Int { Int(bytes.loadUnaligned(fromByteOffset: offset, as: UInt16.self).littleEndian) }
        func u32(_ offset: Int) -> Int { Int(bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self).littleEndian) }
        func u64(_ offset: Int) throws(FormatError) -> Int {
            let value = bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self).littleEndian
            guard value <= UInt64(Int.max) else { throw failure("ZIP64 record", "expected a size or offset below 2^63, found \(value)") }
            return Int(value)
        }

        // The end-of-central-directory record: 22 bytes plus a comment of up to 65535 bytes, at the very end.
        let count = bytes.count
        var eocd = -1
        if count >= 22 {
            var candidate = count - 22
            let lowest = max(0, count - 22 - 65535)
            while candidate >= lowest {
                if u32(candidate) == 0x0605_4B50 && candidate + 22 + u16(candidate + 20) == count {
                    eocd = candidate
                    break
                }
                candidate -= 1
            }
        }
        guard eocd >= 0 else {
            throw failure(nil, "expected a zip archive ending in an end-of-central-directory record, found none in \(count) bytes (truncated, or not a zip archive)")
        }
        var entryCount = u16(eocd + 10)
        var directorySize = u32(eocd + 12)
        var directoryOffset = u32(eocd + 16)
        guard u16(eocd + 4) == 0 || u16(eocd + 4) == 0xFFFF else {
            throw failure("end of central directory", "expected a single-disk archive, found disk number \(u16(eocd + 4))")
        }
        if entryCount == 0xFFFF || directorySize == 0xFFFF_FFFF || directoryOffset == 0xFFFF_FFFF {
            // ZIP64: a 20-byte locator right before the record points at the ZIP64 end-of-central-directory record.
            let locator = eocd - 20
            guard locator >= 0, u32(locator) == 0x0706_4B50 else {
                throw failure("end of central directory", "expected a ZIP64 locator before a record with 0xFFFF/0xFFFFFFFF fields, found none")
            }
            let record = try u64(locator + 8)
            guard record <= locator - 56, u32(record) == 0x0606_4B50 else {
                throw failure("ZIP64 end of central directory", "expected the record at byte \(record), found no ZIP64 signature there")
            }
            entryCount = try u64(record + 32)
            directorySize = try u64(record + 40)
            directoryOffset = try u64(record + 48)
        }
        guard directoryOffset <= count, directorySize <= count - directoryOffset, directoryOffset + directorySize <= eocd else {
            throw failure("central directory", "expected \(directorySize) bytes at byte \(directoryOffset) before the end record at \(eocd), found them outside the file (truncated?)")
        }
        guard entryCount <= directorySize / 46 else {
            throw failure("central directory", "expected at most \(directorySize / 46) entries in \(directorySize) bytes, found a count of \(entryCount)")
        }

        var entries: [Entry] = []
        entries.reserveCapacity(entryCount)
        var index: [String: Int] = [:]
        var at = directoryOffset
        let end = directoryOffset + directorySize
        for n in 0..<entryCount {
            guard at + 46 <= end, u32(at) == 0x0201_4B50 else {
                throw failure("central directory", "expected record \(n) of \(entryCount) at byte \(at), found \(at + 46 <= end ? "no record signature" : "the end of the directory")")
            }
            let flags = UInt16(u16(at + 8))
            let method = UInt16(u16(at + 10))
            let crc = UInt32(u32(at + 16))
            var compressed = u32(at + 20)
            var uncompressed = u32(at + 24)
            let nameLength = u16(at + 28)
            let extraLength = u16(at + 30)
            let commentLength = u16(at + 32)
            var localOffset = u32(at + 42)
            let recordEnd = at + 46 + nameLength + extraLength + commentLength
            guard recordEnd <= end else { throw failure("central directory", "record \(n) runs past the end of the directory") }
            let nameBytes = UnsafeRawBufferPointer(rebasing: bytes[(at + 46)..<(at + 46 + nameLength)])
            guard let name = String(validating: nameBytes, as: UTF8.self) else {
                throw failure("central directory", "record \(n): expected a UTF-8 entry name, found invalid bytes")
            }
            // ZIP64 extended information: the 64-bit values of exactly the fields that hold 0xFFFFFFFF, in order.
            var extra = at + 46 + nameLength
            let extraEnd = extra + extraLength
            while extra + 4 <= extraEnd {
                let id = u16(extra), size = u16(extra + 2)
                guard extra + 4 + size <= extraEnd else { throw failure("entry '\(name)'", "extra field runs past its record") }
                if id == 0x0001 {
                    var field = extra + 4
                    for slot in 0..<3 {
                        let wide: Bool = [uncompressed, compressed, localOffset][slot] == 0xFFFF_FFFF
                        guard wide else { continue }
                        guard field + 8 <= extra + 4 + size else {
                            throw failure("entry '\(name)'", "expected a 64-bit value in the ZIP64 extra field, found it too short")
                        }
                        let value = try u64(field)
                        switch slot {
                        case 0: uncompressed = value
                        case 1: compressed = value
                        default: localOffset = value
                        }
                        field += 8
                    }
                }
                extra += 4 + size
            }
            guard localOffset <= count - 30, compressed <= count - 30 - localOffset else {
                throw failure("entry '\(name)'", "expected a local header and \(compressed) bytes of data at byte \(localOffset), found the file ending at \(count) (truncated?)")
            }
            guard index[name] == nil else { throw failure("entry '\(name)'", "expected unique entry names, found this one twice") }
            index[name] = entries.count
            entries.append(Entry(name: name, localHeaderOffset: localOffset, compressedSize: compressed, crc32: crc, method: method,
                                 flags: flags, uncompressedSize: uncompressed))
            at = recordEnd
        }
        self.entries = entries
        self.index = index
    }

    /// Opens and parses the archive at `path`.
    public init(path: String) throws(FormatError) {
        try self.init(storage: MappedFile(path: path))
    }

    /// The entry named `name`, if any.
    public func entry(named name: String) -> Entry? { index[name].map { entries[$0] } }

    /// Where an entry's (stored) bytes lie in the file, after checking its local header: its own name and extra
    /// field (torch's alignment padding) precede the data.
    public func dataRange(of entry: Entry) throws(FormatError) -> Range<Int> {
        let bytes = storage.bytes, count = bytes.count, at = entry.localHeaderOffset
        func failure(_ message: String) -> FormatError { FormatError(.zip, file: path, subject: "entry '\(entry.name)'", message) }
        guard at <= count - 30, bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self).littleEndian == 0x0403_4B50 else {
            throw failure("expected a local header at byte \(at), found \(at <= count - 30 ? "no local header signature" : "the end of the file") (truncated?)")
        }
        let nameLength = Int(bytes.loadUnaligned(fromByteOffset: at + 26, as: UInt16.self).littleEndian)
        let extraLength = Int(bytes.loadUnaligned(fromByteOffset: at + 28, as: UInt16.self).littleEndian)
        let dataStart = at + 30 + nameLength + extraLength
        guard dataStart <= count, UnsafeRawBufferPointer(rebasing: bytes[(at + 30)..<(at + 30 + nameLength)]).elementsEqual(entry.name.utf8) else {
            throw failure("expected the local header at byte \(at) to name the same entry, found another name")
        }
        guard entry.compressedSize <= count - dataStart else {
            throw failure("expected \(entry.compressedSize) bytes of data at byte \(dataStart), found the file ending at \(count) (truncated?)")
        }
        return dataStart..<(dataStart + entry.compressedSize)
    }

    /// The bytes of a stored entry, after checking its local header and its CRC-32 (which reads every byte once).
    public func data(of entry: Entry) throws(FormatError) -> UnsafeRawBufferPointer {
        let subject = "entry '\(entry.name)'"
        guard entry.flags & 1 == 0 else { throw FormatError(.zip, file: path, subject: subject, "expected an unencrypted entry, found an encrypted one") }
        guard entry.method == 0 else {
            throw FormatError(.zip, file: path, subject: subject, "expected a stored (uncompressed) entry as torch.save writes them, found compression method \(entry.method)")
        }
        guard entry.uncompressedSize == entry.compressedSize else {
            throw FormatError(.zip, file: path, subject: subject, "expected a stored entry's sizes to agree, found \(entry.compressedSize) stored and \(entry.uncompressedSize) uncompressed bytes")
        }
        let data = UnsafeRawBufferPointer(rebasing: storage.bytes[try dataRange(of: entry)])
        let crc = data.isEmpty ? 0 : pg_crc32(0, data.baseAddress, data.count)
        guard crc == entry.crc32 else {
            throw FormatError(.zip, file: path, subject: subject, "expected CRC-32 \(Self.hex(entry.crc32)), found \(Self.hex(crc)) (the archive is damaged)")
        }
        return data
    }

    private static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
    }
}
