/// A fixed-capacity FIFO that, when full, makes room by dropping its oldest element.
struct RingBuffer<Element> {
    let capacity: Int
    private var storage: [Element?]
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) {
        self.capacity = Swift.max(capacity, 0)
        storage = Array(repeating: nil, count: self.capacity)
    }

    var isEmpty: Bool { count == 0 }

    /// Appends `element`; returns the oldest element if it was dropped to make room (or `element`
    /// itself if the capacity is zero).
    @discardableResult
    mutating func append(_ element: Element) -> Element? {
        guard capacity > 0 else { return element }
        if count < capacity {
            storage[(head + count) % capacity] = element
            count += 1
            return nil
        }
        let dropped = storage[head]
        storage[head] = element
        head = (head + 1) % capacity
        return dropped
    }

    /// The elements, oldest first.
    var elements: [Element] {
        (0..<count).compactMap { storage[(head + $0) % capacity] }
    }

    /// Removes and returns every element, oldest first.
    mutating func removeAll() -> [Element] {
        let all = elements
        for offset in 0..<count { storage[(head + offset) % capacity] = nil }
        head = 0
        count = 0
        return all
    }
}
