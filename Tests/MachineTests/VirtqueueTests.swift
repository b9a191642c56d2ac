import Foundation
import FerryTestSupport
import Testing
@testable import Machine

/// The virtqueue and the block device in-process, on guest memory without a VM: well-formed
/// requests do what they say, and no ring or descriptor a guest can write makes the device read
/// or write outside guest RAM or crash.
@Suite struct VirtqueueTests {
    static let ram: UInt64 = 1 << 20
    // Where the test's driver puts things in its 1 MiB of "guest RAM".
    static let table: UInt64 = 0x1000, driverArea: UInt64 = 0x2000, deviceArea: UInt64 = 0x3000
    static let indirectTable: UInt64 = 0x4000, header: UInt64 = 0x5000, status: UInt64 = 0x5100, data: UInt64 = 0x6000

    /// A driver for one queue at the test's fixed addresses.
    static func driver(_ memory: GuestMemory) throws -> DriverQueue {
        try DriverQueue(memory: memory, table: table, driverArea: driverArea, deviceArea: deviceArea)
    }

    static func disk(sectors: Int = 64) throws -> (TemporaryDirectory, VirtioBlock) {
        let directory = try TemporaryDirectory()
        let path = directory.path("disk.img")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: sectors * 512)))
        return (directory, try VirtioBlock(DiskConfiguration(id: "test-disk", path: path)))
    }

    @Test func writeThenReadThroughDirectAndIndirectChains() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: Self.ram)])
        let (directory, disk) = try Self.disk()
        let driver = try Self.driver(memory)
        let pattern = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try memory.write(pattern, at: Self.data)
        try driver.blockRequest(type: 1, sector: 4, length: 1024)
        let write = try #require(try driver.queue.pop(memory))
        #expect(write.buffers.count == 3)
        #expect(try disk.handle(write, queue: 0, memory: memory) == 1)
        #expect(try memory.read(UInt8.self, at: Self.status) == 0)
        let file = try #require(FileManager.default.contents(atPath: directory.path("disk.img")))
        #expect(Array(file[2048..<3072]) == pattern)

        try memory.fill(0, count: 1024, at: Self.data)
        try driver.blockRequest(type: 0, sector: 4, length: 1024, indirect: true)
        let read = try #require(try driver.queue.pop(memory))
        #expect(try disk.handle(read, queue: 0, memory: memory) == 1025)
        #expect(try memory.read(count: 1024, at: Self.data) == pattern)
        try driver.queue.push(head: read.head, written: 1025, memory)
        #expect(try memory.read(UInt16.self, at: Self.deviceArea + 2) == 1)
        #expect(try memory.read(UInt32.self, at: Self.deviceArea + 8) == 1025)
    }

    @Test func requestsBeyondTheDiskOrUnknownFailWithAStatusNotAnError() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: Self.ram)])
        let (_, disk) = try Self.disk(sectors: 8)
        let driver = try Self.driver(memory)
        for (type, sector, expected) in [(UInt32(0), UInt64(7), UInt8(1)), (1, UInt64.max / 256, 1), (99, 0, 2), (8, 0, 0)] {
            try driver.blockRequest(type: type, sector: sector, length: 1024)
            let chain = try #require(try driver.queue.pop(memory))
            _ = try disk.handle(chain, queue: 0, memory: memory)
            #expect(try memory.read(UInt8.self, at: Self.status) == expected, "type \(type) sector \(sector)")
        }
        // get-id answered with the disk's id.
        #expect(Array(try memory.read(count: 9, at: Self.data)) == Array("test-disk".utf8))
    }

    @Test func aReadOnlyDiskRefusesWritesWithAnIOErrorAndKeepsItsData() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: Self.ram)])
        let directory = try TemporaryDirectory()
        let path = directory.path("ro.img")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 0xAB, count: 8 * 512)))
        let disk = try VirtioBlock(DiskConfiguration(id: "ro", path: path, readOnly: true))
        #expect(disk.features & VirtioBlock.featureReadOnly != 0)
        let driver = try Self.driver(memory)
        for type in [UInt32(1), 11, 13] {   // write, discard, write-zeroes
            try memory.fill(0, count: 512, at: Self.data)
            try memory.write(UInt64(0), at: Self.data)                   // a discard segment: sector 0
            try memory.write(UInt32(1), at: Self.data + 8)               // one sector
            try driver.blockRequest(type: type, sector: 0, length: 512)
            let chain = try #require(try driver.queue.pop(memory))
            _ = try disk.handle(chain, queue: 0, memory: memory)
            #expect(try memory.read(UInt8.self, at: Self.status) == 1, "type \(type): VIRTIO_BLK_S_IOERR")
        }
        #expect(FileManager.default.contents(atPath: path) == Data(repeating: 0xAB, count: 8 * 512))
    }

    @Test func aDescriptorLoopIsCaught() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: Self.ram)])
        let driver = try Self.driver(memory)
        try driver.descriptor(0, address: Self.data, length: 16, flags: 1, next: 1)
        try driver.descriptor(1, address: Self.data, length: 16, flags: 1, next: 0)
        try driver.makeAvailable(0)
        #expect { _ = try driver.queue.pop(memory) } throws: { "\($0)".contains("loop") }
    }

    @Test func devicePagesAreRecordedOnlyWhileTracking() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: Self.ram)])
        memory.recordDeviceWrite(at: 0x3000, count: 8)
        #expect(memory.takeDeviceWrites() == nil)
        memory.trackDeviceWrites(true)
        memory.recordDeviceWrite(at: 0x2FFF, count: 2)        // pages 2 and 3
        memory.recordDeviceWrite(at: 0x10000, count: 0x2000)  // pages 16 and 17
        let taken = try #require(memory.takeDeviceWrites())
        #expect(taken[0][0] == (1 << 2 | 1 << 3 | 1 << 16 | 1 << 17))
        #expect(memory.takeDeviceWrites()?[0][0] == 0)
    }

    /// Thousands of corrupted tables and rings: every pop either refuses with a `VirtioError` or
    /// returns buffers inside guest RAM, and serving what it returns never crashes.
    @Test(arguments: [UInt64(1), 2, 3, 4])
    func corruptedRingsNeverReachOutsideGuestRAM(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: Self.ram)])
        let (_, disk) = try Self.disk()
        var refused = 0, served = 0
        for _ in 0..<1500 {
            let driver = try Self.driver(memory)
            // Mostly plausible values, some hostile ones: addresses near and past the end of RAM,
            // huge lengths, every flag combination, any next index.
            func address() -> UInt64 {
                switch random.next() % 4 {
                case 0: random.next()
                case 1: Self.ram - random.next() % 64
                default: Self.data + random.next() % 0x1000
                }
            }
            for index in 0..<UInt16(16) {
                let length = random.next() % 3 == 0 ? UInt32(truncatingIfNeeded: random.next()) : UInt32(random.next() % 2048)
                try driver.descriptor(index, address: address(), length: length, flags: UInt16(random.next() % 8),
                                      next: UInt16(random.next() % 20))
                try driver.descriptor(index, in: Self.indirectTable, address: address(), length: UInt32(random.next() % 4096),
                                      flags: UInt16(random.next() % 8), next: UInt16(random.next() % 20))
            }
            try memory.write(UInt32(random.next() % 16), at: Self.header)
            try driver.makeAvailable(UInt16(random.next() % 20))
            if random.next() % 8 == 0 { try memory.write(UInt16(truncatingIfNeeded: random.next()), at: Self.driverArea + 2) }
            do {
                guard let chain = try driver.queue.pop(memory) else { continue }
                for buffer in chain.buffers {
                    #expect(memory.contains(buffer.address, count: Int(buffer.length)))
                }
                _ = try? disk.handle(chain, queue: 0, memory: memory)
                served += 1
            } catch {
                refused += 1
            }
        }
        #expect(refused > 0 && served > 0, "the cases exercise both outcomes: \(refused) refused, \(served) served")
    }
}

extension DriverQueue {
    /// A block request: header {type, 0, sector}, one data buffer, a status byte.
    func blockRequest(type: UInt32, sector: UInt64, length: UInt32, indirect: Bool = false) throws {
        try memory.write(type, at: VirtqueueTests.header)
        try memory.write(UInt32(0), at: VirtqueueTests.header + 4)
        try memory.write(sector, at: VirtqueueTests.header + 8)
        try memory.write(UInt8(0xEE), at: VirtqueueTests.status)
        let dataFlags: UInt16 = type == 0 || type == 8 ? 2 : 0
        let table = indirect ? VirtqueueTests.indirectTable : VirtqueueTests.table
        try descriptor(0, in: table, address: VirtqueueTests.header, length: 16, flags: 1, next: 1)
        try descriptor(1, in: table, address: VirtqueueTests.data, length: length, flags: dataFlags | 1, next: 2)
        try descriptor(2, in: table, address: VirtqueueTests.status, length: 1, flags: 2)
        if indirect { try descriptor(0, address: VirtqueueTests.indirectTable, length: 48, flags: 4) }
        try makeAvailable(0)
    }
}
