# frozen_string_literal: true

require_relative "spec_helper"

# GC safety and memory: messages survive GC.stress and compaction with their values intact,
# and long build/encode/decode loops (including the error paths) keep memory flat.
RSpec.describe "Flowctl messages under the GC" do
  include MessageHelpers

  let(:hb) { Flowctl::ControlPlane::ProcessorHeartbeatRequest }
  let(:reg) { Flowctl::ControlPlane::RegisterProcessorRequest }
  let(:data) { Flowctl::Processor::DataMessage }
  let(:caps) { Flowctl::Processor::CapabilitiesResponse }

  # One round of everything the message layer does, checked: returns nothing, raises on a bad value.
  def exercise(i)
    t = Time.at(1_700_000_000 + i, i * 7 % 1_000_000_000, :nsec)
    metrics = { "rps" => i * 1.5, "lag" => -i.to_f, "ok#{i % 3}" => 1 }
    msg = hb.new(processor_id: "p-#{i}", timestamp: t, metrics: metrics, status: "HEALTHY")
    msg.metrics["extra"] = 0.5
    back = hb.decode(msg.to_proto)
    raise "heartbeat #{i} lost values: #{back.inspect}" unless back == msg && back.timestamp.nsec == t.nsec
    raise "heartbeat #{i} to_h" unless back.to_h[:metrics]["extra"] == 0.5

    payload = "x#{i}".b * 100
    d = data.new(payload: payload, metadata: { "k" => "v#{i}", "é" => "中" })
    d2 = data.decode(d.to_proto).dup
    d2.metadata["new"] = "1"
    raise "data #{i}: #{d2.inspect[0, 200]}" unless d2.payload == payload && d2.metadata.size == 3 && d.metadata.size == 2

    c = caps.new(input_event_types: %w[a b], max_concurrent: -i).freeze
    raise "caps #{i}" unless caps.decode(c.to_proto) == c && c.inspect.include?("max_concurrent: #{-i}")
  end

  # Runs the block with GC.stress set to `mode` (true: a full GC at every allocation;
  # 1: a minor GC at every allocation, cheap enough for a long loop).
  def under_stress(mode)
    was = GC.stress
    GC.stress = mode
    yield
  ensure
    GC.stress = was
  end

  it "builds, encodes, decodes, copies and compares correctly with a full GC at every allocation" do
    under_stress(true) { 4.times { |i| exercise(i) } }
  end

  it "does so for a long loop with a minor GC at every allocation" do
    under_stress(1) { scaled(300, 30).times { |i| exercise(i) } }
  end

  it "raises and recovers cleanly under GC.stress" do
    raised = []
    catching = lambda do |&blk|
      blk.call
      raised << nil
    rescue StandardError => e
      raised << e.class
    end
    under_stress(true) do
      2.times do |i|
        catching.call { reg.new(metadata: { "a" => "b", "c" => i }) }
        catching.call { hb.decode("\x0a\x05ab".b) }
        m = hb.new(metrics: { "a" => 1.0 })
        m.metrics["bad"] = "x"
        catching.call { m.to_proto }
        m.metrics.delete("bad")
        catching.call { m.to_proto }
      end
    end
    expect(raised).to eq([TypeError, Flowctl::DecodeError, TypeError, nil] * 2)
  end

  it "keeps every value through compaction" do
    msgs = Array.new(200) do |i|
      hb.new(processor_id: "p#{i}", timestamp: Time.at(i, i, :nsec), metrics: { "m#{i}" => i.to_f }, status: "s#{i}")
    end
    decoded = msgs.map { |m| hb.decode(m.to_proto) }
    GC.verify_compaction_references(double_heap: true, toward: :empty) if GC.respond_to?(:verify_compaction_references)
    GC.compact if GC.respond_to?(:compact)
    msgs.each_with_index do |m, i|
      expect(m.processor_id).to eq("p#{i}")
      expect(m.metrics).to eq("m#{i}" => i.to_f)
      expect(m.timestamp).to eq(Time.at(i, i, :nsec))
      expect(decoded[i]).to eq(m)
      expect(hb.decode(m.to_proto)).to eq(m)
    end
    expect(Flowctl::Native.message_class(hb.descriptor_name)).to equal(hb)
  end

  it "keeps the classes and the enum usable after compaction" do
    GC.verify_compaction_references(double_heap: true, toward: :empty) if GC.respond_to?(:verify_compaction_references)
    message_classes.each do |klass|
      expect(klass.decode(klass.new.to_proto)).to eq(klass.new)
      expect(Flowctl::Native.message_class(klass.descriptor_name)).to equal(klass)
    end
    expect(Flowctl::Common::HealthStatus.name(2)).to eq(:HEALTHY)
  end

  describe "memory", skip: (MessageHelpers::STRESS ? "too slow under GC_STRESS" : false) do
    # Runs the block `n` times after a warm-up and returns [growth of the memory malloc holds
    # in KiB, growth of live Ruby slots]. malloc_trim makes RSS track what is really held.
    def growth(n, &block)
      n.times(&block) # warm-up: the heap settles into its working size first
      rss0, slots0 = settled_memory
      n.times(&block)
      rss1, slots1 = settled_memory
      warn "  growth: #{rss1 - rss0} KiB, #{slots1 - slots0} slots" if ENV["MSG_GROWTH"]
      [rss1 - rss0, slots1 - slots0]
    end

    def settled_memory
      2.times { GC.start(full_mark: true, immediate_sweep: true) }
      [trimmed_rss_kib, GC.stat(:heap_live_slots)]
    end

    # A leak of 200 bytes per round over 10_000 rounds is 2 MB.
    LIMIT_KIB = 2048

    # Under valgrind (rake memcheck) RSS says nothing: its malloc keeps up to 20 MB of freed
    # blocks aside and malloc_trim is not its own; valgrind's leak check is the test there.
    def expect_flat(rss, slots)
      expect(rss).to be < LIMIT_KIB, "memory grew #{rss} KiB" unless ENV["FLOWCTL_MEMCHECK"]
      expect(slots).to be < 5_000, "live slots grew by #{slots}"
    end

    let(:big_payload) { "p".b * 16_384 }
    let(:t) { Time.at(1_700_000_000, 123, :nsec) }

    it "stays flat over many builds, encodes and decodes" do
      metrics = { "rps" => 1.5, "lag" => 2.0, "errors" => 0.0 }
      rss, slots = growth(10_000) do
        m = hb.new(processor_id: "processor-1", timestamp: t, metrics: metrics, status: "HEALTHY")
        hb.decode(m.to_proto).metrics.each { |_k, v| v }
        data.decode(data.new(payload: big_payload, metadata: { "k" => "v" }).to_proto).payload
      end
      expect_flat(rss, slots)
    end

    it "stays flat when decode fails deep inside a large message" do
      good = data.new(payload: big_payload, metadata: (1..20).to_h { |i| ["k#{i}", "v" * 100] }).to_proto
      bad_utf8 = good + "\x12\x05\x0a\x01k\x12\x00".b + "\x12\x06\x0a\x01\xff\x12\x01v".b # last entry: invalid key
      truncated = good.byteslice(0, good.bytesize - 3)
      rss, slots = growth(10_000) do
        begin
          data.decode(bad_utf8)
        rescue Flowctl::DecodeError
          nil
        end
        begin
          data.decode(truncated)
        rescue Flowctl::DecodeError
          nil
        end
      end
      expect_flat(rss, slots)
    end

    it "stays flat when construction or encoding fails after large fields were converted" do
      meta = (1..50).to_h { |i| ["key#{i}", "v" * 200] }
      bad_meta = meta.merge("zz" => 1)
      rss, slots = growth(10_000) do
        begin
          data.new(payload: big_payload, metadata: bad_meta)
        rescue TypeError
          nil
        end
        m = data.new(payload: big_payload, metadata: meta)
        m.metadata["zz"] = :bad
        begin
          m.to_proto
        rescue TypeError
          nil
        end
      end
      expect_flat(rss, slots)
    end
  end
end
