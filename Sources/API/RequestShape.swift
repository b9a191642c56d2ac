import VMM

/// A JSON document as the request sent it: what `RequestShape` checks before the body is decoded
/// into the types Ferry uses.
indirect enum JSONValue: Decodable, Equatable, Sendable {
    case null
    case bool(Bool)
    case integer(Int64)
    /// A number with a fraction, or one beyond 64 bits.
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Int64.self) {
            self = .integer(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    /// The member at `path` (object keys), nil where any step is absent or null.
    subscript(_ path: String...) -> JSONValue? {
        var value: JSONValue? = self
        for key in path {
            guard case let .object(members)? = value, let member = members[key], member != .null else { return nil }
            value = member
        }
        return value
    }

    var elements: [JSONValue] {
        if case let .array(elements) = self { elements } else { [] }
    }
}

/// What a request body must look like: types, required members, enumerations and bounds, as
/// Cloud Hypervisor's API defines its bodies — also for the members Ferry does not use, so that
/// a malformed body is refused naming the member rather than accepted because Ferry ignores it.
/// Members a shape does not list are allowed (Cloud Hypervisor ignores them too); `null` stands
/// for an absent optional member.
indirect enum RequestShape: Sendable {
    case string(oneOf: [String]? = nil)
    case integer(ClosedRange<Int64> = Int64.min...Int64.max)
    case boolean
    case array(RequestShape)
    case object([String: RequestShape], required: Set<String> = [])

    static let unsigned = RequestShape.integer(0...Int64.max)
    static let positive = RequestShape.integer(1...Int64.max)

    /// Checks `value` at `path` (`disks[0].rate_limiter_config.bandwidth.size`); the error names
    /// the path and what it should be.
    func check(_ value: JSONValue, at path: String) throws(VMMError) {
        func refuse(_ expected: String) -> VMMError {
            VMMError(.invalidRequest, "\(path.isEmpty ? "request body" : path): expected \(expected)")
        }
        switch (self, value) {
        case let (.string(choices), .string(text)):
            if let choices, !choices.contains(text) {
                throw VMMError(.invalidRequest, "\(path): '\(text)' is not one of \(choices.joined(separator: ", "))")
            }
        case (.string(let choices), _):
            throw refuse(choices.map { "one of \($0.joined(separator: ", "))" } ?? "a string")
        case let (.integer(range), .integer(number)):
            guard range.contains(number) else {
                throw VMMError(.invalidRequest, "\(path): \(number) is \(number < range.lowerBound ? "below the minimum of \(range.lowerBound)" : "above the maximum of \(range.upperBound)")")
            }
        case (.integer, _):
            throw refuse("an integer")
        case (.boolean, .bool):
            break
        case (.boolean, _):
            throw refuse("true or false")
        case let (.array(element), .array(elements)):
            for (index, item) in elements.enumerated() {
                try element.check(item, at: "\(path)[\(index)]")
            }
        case (.array, _):
            throw refuse("an array")
        case let (.object(members, required), .object(fields)):
            for name in required.sorted() where fields[name] == nil || fields[name] == .null {
                throw VMMError(.invalidRequest, "\(path.isEmpty ? "" : path + ".")\(name): required field is missing")
            }
            for (name, field) in fields.sorted(by: { $0.key < $1.key }) where field != .null {
                try members[name]?.check(field, at: path.isEmpty ? name : "\(path).\(name)")
            }
        case (.object, _):
            throw refuse("an object")
        }
    }
}

extension RequestShape {
    /// Where a device sits on the PCI side, which every Cloud Hypervisor device may say.
    private static let placement: [String: RequestShape] = [
        "id": .string(), "iommu": .boolean, "pci_segment": .integer(0...65_535), "pci_device_id": .integer(0...255),
    ]

    private static func device(_ members: [String: RequestShape], required: Set<String> = []) -> RequestShape {
        .object(placement.merging(members) { _, own in own }, required: required)
    }

    private static let tokenBucket = RequestShape.object(
        ["size": .unsigned, "one_time_burst": .unsigned, "refill_time": .unsigned], required: ["size", "refill_time"])
    private static let rateLimiter = RequestShape.object(["bandwidth": tokenBucket, "ops": tokenBucket])
    private static let hostCPUs = RequestShape.array(.unsigned)
    private static let consoleModes = ["Off", "Pty", "Tty", "File", "Socket", "Null"]

    private static let cpus = RequestShape.object([
        "boot_vcpus": .positive, "max_vcpus": .positive,
        "topology": .object(["threads_per_core": .positive, "cores_per_die": .positive,
                             "dies_per_package": .positive, "packages": .positive]),
        "kvm_hyperv": .boolean, "max_phys_bits": .integer(1...64), "nested": .boolean,
        "affinity": .array(.object(["vcpu": .unsigned, "host_cpus": hostCPUs], required: ["vcpu", "host_cpus"])),
        "features": .object(["amx": .boolean]),
        "core_scheduling": .string(oneOf: ["Vm", "Vcpu", "Off"]),
    ], required: ["boot_vcpus"])

    private static let memoryZone = RequestShape.object([
        "id": .string(), "size": .unsigned, "file": .string(), "mergeable": .boolean, "shared": .boolean,
        "hugepages": .boolean, "hugepage_size": .unsigned, "host_numa_node": .unsigned, "hotplug_size": .unsigned,
        "hotplugged_size": .unsigned, "prefault": .boolean, "reserve": .boolean,
    ], required: ["id", "size"])

    private static let memory = RequestShape.object([
        "size": .integer(), "hotplug_size": .unsigned, "hotplugged_size": .unsigned, "mergeable": .boolean,
        "hotplug_method": .string(oneOf: ["Acpi", "VirtioMem"]), "shared": .boolean, "hugepages": .boolean,
        "hugepage_size": .unsigned, "prefault": .boolean, "reserve": .boolean, "thp": .boolean,
        "zones": .array(memoryZone),
    ], required: ["size"])

    private static let payload = RequestShape.object([
        "firmware": .string(), "kernel": .string(), "cmdline": .string(), "initramfs": .string(),
        "igvm": .string(), "host_data": .string(),
    ])

    private static let disk = device([
        "path": .string(), "readonly": .boolean, "direct": .boolean, "num_queues": .positive,
        "queue_size": .positive, "vhost_user": .boolean, "vhost_socket": .string(), "rate_limiter_config": rateLimiter,
        "serial": .string(), "rate_limit_group": .string(),
        "queue_affinity": .array(.object(["queue_index": .unsigned, "host_cpus": hostCPUs], required: ["queue_index", "host_cpus"])),
        "backing_files": .boolean, "sparse": .boolean,
        "image_type": .string(oneOf: ["FlatVmdk", "FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]),
        "lock_granularity": .string(oneOf: ["ByteRange", "Full"]),
    ])

    /// Cloud Hypervisor's `NetConfig` (`vm.create`'s `net[]` and `vm.add-net`'s body).
    static let net = device([
        "tap": .string(), "ip": .string(), "mask": .string(), "mac": .string(), "host_mac": .string(),
        "mtu": .positive, "num_queues": .positive, "queue_size": .positive, "vhost_user": .boolean,
        "vhost_socket": .string(), "vhost_mode": .string(oneOf: ["Client", "Server"]),
        "rate_limiter_config": rateLimiter, "offload_tso": .boolean, "offload_ufo": .boolean,
        "offload_csum": .boolean, "fds": .array(.integer()),
    ])

    private static let serial = RequestShape.object(["mode": .string(oneOf: consoleModes), "file": .string(), "socket": .string()],
                                                    required: ["mode"])

    /// Cloud Hypervisor's `VmConfig` (`vm.create`).
    static let vmConfig = RequestShape.object([
        "cpus": cpus,
        "memory": memory,
        "payload": payload,
        "rate_limit_groups": .array(.object(["id": .string(), "rate_limiter_config": rateLimiter],
                                            required: ["id", "rate_limiter_config"])),
        "disks": .array(disk),
        "net": .array(net),
        "rng": device(["src": .string()], required: ["src"]),
        "balloon": device(["size": .unsigned, "deflate_on_oom": .boolean, "free_page_reporting": .boolean], required: ["size"]),
        "fs": .array(device(["tag": .string(), "socket": .string(), "num_queues": .positive, "queue_size": .positive],
                            required: ["tag", "socket", "num_queues", "queue_size"])),
        "generic_vhost_user": .array(device(["socket": .string(), "queue_sizes": .array(.integer(0...65_535)),
                                            "device_type": .integer(0...Int64(UInt32.max))],
                                           required: ["socket", "queue_sizes", "device_type"])),
        "pmem": .array(device(["file": .string(), "size": .unsigned, "discard_writes": .boolean], required: ["file"])),
        "serial": serial,
        "console": device(["mode": .string(oneOf: consoleModes), "file": .string(), "socket": .string()], required: ["mode"]),
        "debug_console": .object(["mode": .string(oneOf: consoleModes), "file": .string(), "iobase": .integer(0...65_535)],
                                 required: ["mode"]),
        "devices": .array(device(["path": .string(), "x_nv_gpudirect_clique": .integer(-128...127),
                                  "x_exclude_mmap_bars": .array(.integer())])),
        "user_devices": .array(device(["socket": .string()], required: ["socket"])),
        "vdpa": .array(device(["path": .string(), "num_queues": .positive], required: ["path", "num_queues"])),
        "vsock": device(["cid": .integer(3...Int64.max), "socket": .string()], required: ["cid", "socket"]),
        "numa": .array(.object([
            "guest_numa_id": .unsigned, "cpus": .array(.unsigned),
            "distances": .array(.object(["destination": .unsigned, "distance": .unsigned], required: ["destination", "distance"])),
            "memory_zones": .array(.string()), "pci_segments": .array(.unsigned), "device_id": .string(),
        ], required: ["guest_numa_id"])),
        "iommu": .boolean,
        "watchdog": .boolean,
        "rtc": device([:]),
        "pvpanic": .boolean,
        "pci_segments": .array(.object(["pci_segment": .integer(0...65_535), "mmio32_aperture_weight": .unsigned,
                                        "mmio64_aperture_weight": .unsigned], required: ["pci_segment"])),
        "platform": .object([
            "num_pci_segments": .integer(1...65_535), "iommu_segments": .array(.integer(0...65_535)),
            "iommu_address_width_bits": .integer(0...255), "system_serial_number": .string(), "serial_number": .string(),
            "system_uuid": .string(), "uuid": .string(), "oem_strings": .array(.string()), "system_manufacturer": .string(),
            "system_product_name": .string(), "system_version": .string(), "system_family": .string(),
            "system_sku_number": .string(), "chassis_asset_tag": .string(), "tdx": .boolean, "sev_snp": .boolean,
            "iommufd": .boolean, "vfio_p2p_dma": .boolean,
        ]),
        "tpm": .object(["socket": .string()], required: ["socket"]),
        "landlock_enable": .boolean,
        "landlock_rules": .array(.object(["path": .string(), "access": .string()], required: ["path", "access"])),
    ], required: ["payload"])

    /// Cloud Hypervisor's `RestoreConfig` (`vm.restore`), with Ferry's `net_fds` in libvirt's shape.
    static let restoreConfig = RequestShape.object([
        "source_url": .string(), "prefault": .boolean, "resume": .boolean,
        "memory_restore_mode": .string(oneOf: ["Copy", "OnDemand", "CopyOnWrite"]),
        "zone_updates": .array(.object(["id": .string(), "host_numa_node": .unsigned], required: ["id", "host_numa_node"])),
        "net_fds": .array(.object(["id": .string(), "num_fds": .positive], required: ["id", "num_fds"])),
    ], required: ["source_url"])
}

/// What Cloud Hypervisor's `VmConfig` can ask for that Ferry's machine does not do: a body that
/// asks for any of it is refused naming the member, rather than run without it.
enum UnsupportedRequest {
    /// The first member of `config` (a `vm.create` body) that asks for something Ferry does not
    /// do, and why; nil when there is none. Members at their default values ask for nothing.
    static func firstInVmConfig(_ config: JSONValue) -> (member: String, why: String)? {
        let reason = UnsupportedOption.reason
        var checks: [(String, JSONValue?, (JSONValue) -> Bool, String)] = [
            ("cpus.topology", config["cpus", "topology"], { _ in true }, reason("cpus.topology")),
            ("cpus.kvm_hyperv", config["cpus", "kvm_hyperv"], { $0 == .bool(true) }, reason("cpus.kvm_hyperv")),
            ("cpus.affinity", config["cpus", "affinity"], { !$0.elements.isEmpty }, reason("cpus.affinity")),
            ("cpus.features.amx", config["cpus", "features", "amx"], { $0 == .bool(true) }, reason("cpus.features")),
            ("cpus.max_phys_bits", config["cpus", "max_phys_bits"], { _ in true }, reason("cpus.max_phys_bits")),
            ("memory.hugepages", config["memory", "hugepages"], { $0 == .bool(true) }, reason("memory.hugepages")),
            ("memory.hugepage_size", config["memory", "hugepage_size"], { _ in true }, reason("memory.hugepage_size")),
            ("memory.mergeable", config["memory", "mergeable"], { $0 == .bool(true) }, reason("memory.mergeable")),
            ("memory.thp", config["memory", "thp"], { $0 == .bool(false) }, reason("memory.thp")),
            ("memory.prefault", config["memory", "prefault"], { $0 == .bool(true) }, reason("memory.prefault")),
            ("memory.hotplug_size", config["memory", "hotplug_size"], { $0 != .integer(0) }, reason("memory.hotplug_size")),
            ("memory.hotplugged_size", config["memory", "hotplugged_size"], { $0 != .integer(0) }, reason("memory.hotplugged_size")),
            ("memory.zones", config["memory", "zones"], { !$0.elements.isEmpty }, reason("memory.zones")),
            ("payload.firmware", config["payload", "firmware"], { _ in true }, "Ferry boots kernels directly (PVH or the Linux boot protocol), not firmware"),
            ("payload.igvm", config["payload", "igvm"], { _ in true }, "Ferry has no confidential guests"),
            ("payload.host_data", config["payload", "host_data"], { _ in true }, "Ferry has no confidential guests"),
            ("rate_limit_groups", config["rate_limit_groups"], { !$0.elements.isEmpty }, "Ferry has no I/O rate limiting"),
            ("balloon", config["balloon"], { _ in true }, "Ferry has no balloon device"),
            ("generic_vhost_user", config["generic_vhost_user"], { !$0.elements.isEmpty }, "Ferry has no vhost-user devices"),
            ("debug_console", config["debug_console", "mode"], { $0 != .string("Off") }, "Ferry has no debug console port"),
            ("iommu", config["iommu"], { $0 == .bool(true) }, "Ferry has no virtual IOMMU"),
            ("watchdog", config["watchdog"], { $0 == .bool(true) }, "Ferry has no watchdog device"),
            ("pvpanic", config["pvpanic"], { $0 == .bool(true) }, "Ferry has no pvpanic device"),
            ("rtc", config["rtc"], { _ in true }, "Ferry has no virtio RTC"),
            ("tpm", config["tpm"], { _ in true }, "Ferry has no TPM"),
            ("landlock_enable", config["landlock_enable"], { $0 == .bool(true) }, Self.landlockAtStart),
            ("landlock_rules", config["landlock_rules"], { !$0.elements.isEmpty }, Self.landlockAtStart),
            ("platform.num_pci_segments", config["platform", "num_pci_segments"], { $0 != .integer(1) }, "Ferry has one PCI segment"),
            ("platform.iommu_segments", config["platform", "iommu_segments"], { !$0.elements.isEmpty }, "Ferry has no virtual IOMMU"),
            ("platform.tdx", config["platform", "tdx"], { $0 == .bool(true) }, "Ferry has no confidential guests"),
            ("platform.sev_snp", config["platform", "sev_snp"], { $0 == .bool(true) }, "Ferry has no confidential guests"),
        ]
        for (index, disk) in (config["disks"]?.elements ?? []).enumerated() {
            let field = "disks[\(index)]"
            checks += [
                ("\(field).num_queues", disk["num_queues"], { $0 != .integer(1) }, "Ferry's virtio-blk has one queue"),
                ("\(field).vhost_user", disk["vhost_user"], { $0 == .bool(true) }, "Ferry has no vhost-user backend"),
                ("\(field).rate_limiter_config", disk["rate_limiter_config"], { _ in true }, "Ferry has no I/O rate limiting"),
                ("\(field).rate_limit_group", disk["rate_limit_group"], { _ in true }, "Ferry has no I/O rate limiting"),
                ("\(field).queue_affinity", disk["queue_affinity"], { !$0.elements.isEmpty }, "Ferry does not pin queues"),
                ("\(field).image_type", disk["image_type"], { $0 != .string("Raw") }, "Ferry reads raw images only"),
                ("\(field).iommu", disk["iommu"], { $0 == .bool(true) }, "Ferry has no virtual IOMMU"),
                ("\(field).pci_segment", disk["pci_segment"], { $0 != .integer(0) }, "Ferry has one PCI segment"),
            ]
        }
        for (index, card) in (config["net"]?.elements ?? []).enumerated() {
            checks += RequestShape.netUnsupported(card, field: "net[\(index)]")
        }
        for (field, value, asks, why) in checks {
            if let value, asks(value) { return (field, why) }
        }
        return nil
    }
}

extension RequestShape {
    /// The members of a `NetConfig` that ask for something Ferry's virtio-net does not do
    /// (`vhost_user`, `host_mac`, `mtu` and `fds` are refused with their own reasons later).
    static func netUnsupported(_ card: JSONValue, field: String) -> [(String, JSONValue?, (JSONValue) -> Bool, String)] {
        [
            ("\(field).rate_limiter_config", card["rate_limiter_config"], { _ in true }, "Ferry has no I/O rate limiting"),
            ("\(field).iommu", card["iommu"], { $0 == .bool(true) }, "Ferry has no virtual IOMMU"),
            ("\(field).pci_segment", card["pci_segment"], { $0 != .integer(0) }, "Ferry has one PCI segment"),
        ]
    }
}

extension UnsupportedRequest {
    /// Why `vm.create` cannot turn Landlock on: a domain covers the thread that applies it and the
    /// threads it starts later, and a VMM serving its API already runs many (docs/security.md).
    static let landlockAtStart = "Landlock confines the whole process from its start (--landlock, --landlock-rules); this kernel cannot confine threads already running"
}
