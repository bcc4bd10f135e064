# frozen_string_literal: true

require_relative "spec_helper"

# Bad input never crashes and never silently truncates: every wrong value gets a Ruby
# exception that names what was wrong, and garbage given to decode is a Flowctl::DecodeError.
RSpec.describe "Flowctl message errors" do
  include MessageHelpers

  let(:reg) { Flowctl::ControlPlane::RegisterProcessorRequest }
  let(:hb) { Flowctl::ControlPlane::ProcessorHeartbeatRequest }
  let(:data) { Flowctl::Processor::DataMessage }
  let(:caps) { Flowctl::Processor::CapabilitiesResponse }
  let(:resp) { Flowctl::ControlPlane::RegisterProcessorResponse }

  # Expects the block to raise `error` whose message includes every one of `parts`.
  def expect_error(error, *parts, &block)
    expect(&block).to raise_error(error) { |e| parts.each { |p| expect(e.message).to include(p) } }
  end

  # The same wrong value through the keyword constructor and through the writer.
  def expect_both(error, klass, field, value, *parts)
    expect_error(error, *parts) { klass.new(field => value) }
    msg = klass.new
    expect_error(error, *parts) { msg.public_send(:"#{field}=", value) }
    expect(msg).to eq(klass.new) # a failed write leaves the field as it was
  end

  describe "unknown keywords" do
    it "raise ArgumentError naming the keyword and the class" do
      expect_error(ArgumentError, "bogus", "Flowctl::ControlPlane::RegisterProcessorRequest") { reg.new(bogus: 1) }
      expect_error(ArgumentError, "processorid", reg.name) { reg.new(processor_id: "p", processorid: "q") }
      expect_error(ArgumentError, "payload", "Flowctl::Processor::CapabilitiesRequest") do
        Flowctl::Processor::CapabilitiesRequest.new(payload: "x")
      end
    end

    it "raise for an unknown key in a positional Hash too" do
      expect_error(ArgumentError, "nope", reg.name) { reg.new({ nope: 1 }) }
    end

    it "raise for a positional argument that is not a Hash" do
      expect { reg.new("p1") }.to raise_error { |e| expect([ArgumentError, TypeError]).to include(e.class) }
      expect { reg.new([[:processor_id, "p"]]) }.to raise_error { |e| expect([ArgumentError, TypeError]).to include(e.class) }
    end
  end

  describe "wrong types" do
    it "string fields take only String: TypeError naming class, field and given class" do
      expect_both(TypeError, reg, :processor_id, :p1, reg.name, "processor_id", "Symbol")
      expect_both(TypeError, reg, :endpoint, 42, reg.name, "endpoint", "Integer")
      expect_both(TypeError, reg, :processor_id, nil, reg.name, "processor_id", "NilClass")
      expect_both(TypeError, caps, :version, 1.0, caps.name, "version", "Float")
    end

    it "bytes fields take only String" do
      expect_both(TypeError, data, :payload, [1, 2], data.name, "payload", "Array")
      expect_both(TypeError, data, :payload, nil, data.name, "payload", "NilClass")
      expect_both(TypeError, data, :payload, :x, data.name, "payload", "Symbol")
    end

    it "int32 fields take only Integer" do
      expect_both(TypeError, caps, :max_concurrent, 1.0, caps.name, "max_concurrent", "Float")
      expect_both(TypeError, caps, :max_concurrent, 1.5, caps.name, "max_concurrent", "Float")
      expect_both(TypeError, caps, :max_concurrent, "3", caps.name, "max_concurrent", "String")
      expect_both(TypeError, caps, :max_concurrent, nil, caps.name, "max_concurrent", "NilClass")
    end

    it "bool fields take only true or false" do
      expect_both(TypeError, resp, :success, 1, resp.name, "success", "Integer")
      expect_both(TypeError, resp, :success, nil, resp.name, "success", "NilClass")
      expect_both(TypeError, resp, :success, "true", resp.name, "success", "String")
    end

    it "Timestamp fields take only Time or nil" do
      expect_both(TypeError, hb, :timestamp, 1_700_000_000, hb.name, "timestamp", "Integer")
      expect_both(TypeError, hb, :timestamp, "2024-01-01", hb.name, "timestamp", "String")
      expect_both(TypeError, hb, :timestamp, 1.5, hb.name, "timestamp", "Float")
    end

    it "map fields take only a Hash, never nil" do
      expect_both(TypeError, reg, :metadata, nil, reg.name, "metadata", "NilClass")
      expect_both(TypeError, reg, :metadata, [["k", "v"]], reg.name, "metadata", "Array")
      expect_both(TypeError, hb, :metrics, "x", hb.name, "metrics", "String")
    end

    it "map keys must be Strings (Symbol and others raise TypeError naming the field)" do
      expect_both(TypeError, reg, :metadata, { k: "v" }, reg.name, "metadata", "Symbol")
      expect_both(TypeError, reg, :metadata, { 1 => "v" }, reg.name, "metadata", "Integer")
      expect_both(TypeError, hb, :metrics, { nil => 1.0 }, hb.name, "metrics", "NilClass")
      expect_both(TypeError, hb, :metrics, { cpu: 1.0 }, hb.name, "metrics", "Symbol")
    end

    it "map values must match the value type" do
      expect_both(TypeError, reg, :metadata, { "k" => 1 }, reg.name, "metadata", "Integer")
      expect_both(TypeError, reg, :metadata, { "k" => nil }, reg.name, "metadata", "NilClass")
      expect_both(TypeError, reg, :metadata, { "k" => :v }, reg.name, "metadata", "Symbol")
      expect_both(TypeError, hb, :metrics, { "k" => "1.0" }, hb.name, "metrics", "String")
      expect_both(TypeError, hb, :metrics, { "k" => nil }, hb.name, "metrics", "NilClass")
      expect_both(TypeError, hb, :metrics, { "k" => true }, hb.name, "metrics", "TrueClass")
    end

    it "a bad entry after good ones rejects the whole Hash" do
      good = (1..100).to_h { |i| ["k#{i}", "v#{i}"] }
      expect_both(TypeError, reg, :metadata, good.merge("bad" => 7), reg.name, "metadata")
    end

    it "repeated string fields take only an Array of String" do
      expect_both(TypeError, caps, :input_event_types, "a", caps.name, "input_event_types", "String")
      expect_both(TypeError, caps, :input_event_types, nil, caps.name, "input_event_types", "NilClass")
      expect_both(TypeError, caps, :input_event_types, { "a" => "b" }, caps.name, "input_event_types", "Hash")
      expect_both(TypeError, caps, :output_event_types, ["a", :b], caps.name, "output_event_types", "Symbol")
      expect_both(TypeError, caps, :output_event_types, ["a", nil], caps.name, "output_event_types", "NilClass")
    end
  end

  describe "out of range values" do
    it "int32 outside [-2**31, 2**31) raises RangeError naming the field" do
      [2**31, -2**31 - 1, 2**32, 2**63, -2**64, 2**100].each do |n|
        expect_both(RangeError, caps, :max_concurrent, n, "max_concurrent")
      end
    end

    it "a Time outside what a Timestamp holds (years 1 to 9999) raises naming the field, not a wrapped value" do
      [Time.at(2**70), Time.at(-2**70), Time.at(253_402_300_800), Time.at(-62_135_596_801)].each do |t|
        expect { hb.new(timestamp: t) }.to raise_error { |e|
          expect([RangeError, ArgumentError]).to include(e.class)
          expect(e.message).to include("timestamp")
        }
      end
    end
  end

  describe "invalid UTF-8" do
    let(:bad) { "ab\xFFcd".dup.force_encoding(Encoding::UTF_8) }
    let(:bad_bin) { "ab\xC3".b } # a truncated sequence in a binary String

    it "in a string field raises ArgumentError naming the field" do
      expect_both(ArgumentError, reg, :processor_id, bad, "processor_id")
      expect_both(ArgumentError, reg, :endpoint, bad_bin, "endpoint")
      expect_both(ArgumentError, caps, :name, "\xED\xA0\x80".b, "name") # an encoded surrogate
    end

    it "in a map key or value raises ArgumentError naming the field" do
      expect_both(ArgumentError, reg, :metadata, { bad => "v" }, "metadata")
      expect_both(ArgumentError, reg, :metadata, { "k" => bad }, "metadata")
      expect_both(ArgumentError, hb, :metrics, { bad_bin => 1.0 }, "metrics")
    end

    it "in a repeated element raises ArgumentError naming the field" do
      expect_both(ArgumentError, caps, :input_event_types, ["ok", bad], "input_event_types")
    end
  end

  describe "values put into a live container" do
    it "a bad map value raises TypeError naming the field at to_proto, and the message stays usable" do
      msg = hb.new(metrics: { "ok" => 1.0 })
      msg.metrics["bad"] = "not a number"
      expect_error(TypeError, "metrics") { msg.to_proto }
      msg.metrics.delete("bad")
      expect(hb.decode(msg.to_proto).metrics).to eq("ok" => 1.0)
    end

    it "a bad map key raises TypeError naming the field at to_proto" do
      msg = reg.new
      msg.metadata[:sym] = "v"
      expect_error(TypeError, "metadata") { msg.to_proto }
      msg.metadata[nil] = "v"
      msg.metadata.delete(:sym)
      expect_error(TypeError, "metadata") { msg.to_proto }
    end

    it "invalid UTF-8 put into a map raises ArgumentError naming the field at to_proto" do
      msg = reg.new
      msg.metadata["k"] = "\xFF".b
      expect_error(ArgumentError, "metadata") { msg.to_proto }
    end

    it "a bad repeated element raises TypeError naming the field at to_proto" do
      msg = caps.new
      msg.output_event_types << 42
      expect_error(TypeError, "output_event_types") { msg.to_proto }
    end

    it "also fail ==, hash, to_h and inspect cleanly or not at all (never crash)" do
      msg = hb.new
      msg.metrics[Object.new] = Object.new
      [-> { msg == hb.new }, -> { msg.hash }, -> { msg.to_h }, -> { msg.inspect }, -> { msg.dup }].each do |op|
        op.call
      rescue StandardError => e
        expect([TypeError, ArgumentError]).to include(e.class)
      end
      expect_error(TypeError, "metrics") { msg.to_proto }
    end
  end

  describe "frozen messages" do
    it "raise FrozenError on every writer" do
      msg = caps.new.freeze
      caps.fields.each do |f|
        value = msg.public_send(f)
        expect { msg.public_send(:"#{f}=", value) }.to raise_error(FrozenError)
      end
      expect { hb.new.freeze.timestamp = Time.now }.to raise_error(FrozenError)
      expect { reg.new.freeze.metadata = {} }.to raise_error(FrozenError)
    end

    it "raise FrozenError through #[]= and on containers never read before freezing" do
      msg = reg.new.freeze
      expect { msg[:processor_id] = "x" }.to raise_error(FrozenError)
      expect(msg.metadata).to be_frozen
      expect { msg.metadata["k"] = "v" }.to raise_error(FrozenError)
      expect(msg.to_proto).to eq("".b)
    end

    it "raise FrozenError when their containers are changed" do
      msg = reg.new(metadata: { "a" => "b" }).freeze
      expect { msg.metadata["x"] = "y" }.to raise_error(FrozenError)
      expect { msg.metadata.delete("a") }.to raise_error(FrozenError)
      c = caps.new(input_event_types: ["a"]).freeze
      expect { c.input_event_types << "b" }.to raise_error(FrozenError)
      expect(msg.metadata).to eq("a" => "b")
      expect(c.input_event_types).to eq(["a"])
    end
  end

  describe ".decode" do
    it "raises TypeError for anything but a String" do
      expect { reg.decode(nil) }.to raise_error(TypeError)
      expect { reg.decode(123) }.to raise_error(TypeError)
      expect { reg.decode([1, 2]) }.to raise_error(TypeError)
    end

    it "Flowctl::DecodeError is a Flowctl::Error" do
      expect(Flowctl::DecodeError.ancestors).to include(Flowctl::Error, StandardError)
    end

    {
      "a length running past the end" => "\x0a\x05ab",
      "a truncated varint" => "\x38\xff\xff",
      "a varint longer than 10 bytes" => "\x38#{"\xff" * 10}\x01",
      "a truncated tag" => "\x80",
      "field number 0" => "\x00\x01",
      "an end-group without a start" => "\x0c",
      "a start-group without its end" => "\x0b",
      "wire type 6" => "\x0e\x01",
      "wire type 7" => "\x0f\x01",
      "a truncated fixed64" => "\x79\x01\x02",
      "a truncated fixed32" => "\x7d\x01",
      "a length near 2**64" => "\x7a#{"\xff" * 9}\x01",
      "a length of 2**31" => "\x7a\x80\x80\x80\x80\x08",
      "an unknown group closed by another field's end-group" => "\x7b\x08\x01\x74",
      "an unknown group never closed" => "\x7b\x08\x01",
      "groups nested 100_000 deep" => "\x7b" * 100_000
    }.each do |what, bytes|
      it "raises Flowctl::DecodeError with a message for #{what}" do
        [reg, caps, hb, data].each do |klass|
          expect { klass.decode(bytes.b) }.to raise_error(Flowctl::DecodeError) { |e| expect(e.message).not_to be_empty }
        end
      end
    end

    it "raises Flowctl::DecodeError naming the message for a known field with the wrong wire type" do
      expect_error(Flowctl::DecodeError, "RegisterProcessorRequest") { reg.decode("\x08\x01".b) } # string as varint
      expect_error(Flowctl::DecodeError, "CapabilitiesResponse") { caps.decode("\x3a\x01x".b) }  # int32 as bytes
      expect_error(Flowctl::DecodeError, "RegisterProcessorResponse") { resp.decode("\x15\x01\x00\x00\x00".b) } # bool as fixed32
      expect_error(Flowctl::DecodeError, "DataMessage") { data.decode("\x09#{"\0" * 8}".b) } # bytes as fixed64
      expect_error(Flowctl::DecodeError, "ProcessorHeartbeatRequest") { hb.decode("\x10\x01".b) } # Timestamp as varint
    end

    it "raises Flowctl::DecodeError for invalid UTF-8 in a string field, naming the field" do
      expect_error(Flowctl::DecodeError, "processor_id") { reg.decode("\x0a\x02\xff\xfe".b) }
      expect_error(Flowctl::DecodeError, "endpoint") { reg.decode("\x12\x01\xc3".b) }
      expect_error(Flowctl::DecodeError, "input_event_types") { caps.decode("\x2a\x02ok\x2a\x01\x80".b) }
    end

    it "raises Flowctl::DecodeError for invalid UTF-8 in a map key or value" do
      bad_key = "\x0a\x01\xff\x12\x01v".b
      bad_val = "\x0a\x01k\x12\x01\xff".b
      expect { reg.decode("\x1a#{bad_key.bytesize.chr}".b + bad_key) }.to raise_error(Flowctl::DecodeError, /metadata/)
      expect { reg.decode("\x1a#{bad_val.bytesize.chr}".b + bad_val) }.to raise_error(Flowctl::DecodeError, /metadata/)
    end

    it "raises Flowctl::DecodeError for a Timestamp a Time cannot come from (nanos or seconds out of range)" do
      expect { hb.decode("\x12\x06\x10\x80\x94\xeb\xdc\x03".b) }.to raise_error(Flowctl::DecodeError, /timestamp/) # nanos 1e9
      expect { hb.decode("\x12\x0b\x10#{"\xff" * 9}\x01".b) }.to raise_error(Flowctl::DecodeError, /timestamp/) # nanos -1
      expect { hb.decode("\x12\x07\x08\x80\x83\xd1\xff\xaf\x07".b) }.to raise_error(Flowctl::DecodeError, /timestamp/) # year 10000+
    end

    it "raises Flowctl::DecodeError for garbage inside a Timestamp or a map entry" do
      expect { hb.decode("\x12\x01\x08".b) }.to raise_error(Flowctl::DecodeError)
      expect { hb.decode("\x12\x03\x0a\x01x".b) }.to raise_error(Flowctl::DecodeError) # seconds as bytes
      expect { reg.decode("\x1a\x02\x0a\x05".b) }.to raise_error(Flowctl::DecodeError)
      expect { hb.decode("\x1a\x02\x11\x00".b) }.to raise_error(Flowctl::DecodeError) # truncated double
    end

    it "skips unknown fields inside a map entry (17 bytes that crash google-protobuf 3.21.12's decode)" do
      # entry { key: "éж", field 3 fixed64 } — the official gem segfaults on exactly this input
      bin = "\x0a\x0f\x0a\x04\xc3\xa9\xd0\xb6\x19\x29\x10\x88\x91\x80\x5b\x61\x60".b
      expect(Flowctl::Common::Metrics.decode(bin).values).to eq("éж" => 0.0)
      entry = "\x0a\x01k\x18\x05\x12\x01v\x22\x00".b # key, field 3 varint, value, field 4 bytes
      expect(reg.decode("\x1a#{entry.bytesize.chr}".b + entry).metadata).to eq("k" => "v")
    end

    it "accepts bytes payloads that are not UTF-8 (only string fields are checked)" do
      expect(data.decode("\x0a\x02\xff\xfe".b).payload).to eq("\xff\xfe".b)
    end

    it "raises Flowctl::DecodeError (never crashes or returns a shorter message) for every strict prefix cut inside a field" do
      msg = hb.new(processor_id: "processor-1", timestamp: Time.at(1_700_000_000, 5, :nsec),
                   metrics: { "rps" => 12.5, "lag" => 0.25 }, status: "HEALTHY")
      bin = msg.to_proto
      boundaries = field_boundaries(bin)
      (0...bin.bytesize).each do |cut|
        prefix = bin.byteslice(0, cut)
        if boundaries.include?(cut)
          expect { hb.decode(prefix) }.not_to raise_error
        else
          expect { hb.decode(prefix) }.to raise_error(Flowctl::DecodeError), "cut at #{cut}/#{bin.bytesize}"
        end
      end
    end

    it "either decodes or raises Flowctl::DecodeError for random and mutated bytes, for every class" do
      rng = Random.new(1234)
      seeds = message_classes.map { |k| [k, k.new(**random_values(k, rng)).to_proto] }
      scaled(3000, 150).times do |i|
        klass, good = seeds[i % seeds.size]
        input = case i % 3
                when 0 then rng.bytes(rng.rand(1..40))
                when 1 then flip(good, rng)
                else good.byteslice(0, rng.rand(0..good.bytesize)) + rng.bytes(rng.rand(0..3))
                end
        begin
          out = klass.decode(input)
          expect(out).to be_a(klass)
          out.to_h # whatever decoded reads back
          out.inspect
        rescue Flowctl::DecodeError => e
          expect(e.message).not_to be_empty
        end
      end
    end
  end

  # Offsets where a top-level field ends (and 0): cutting there leaves a valid message.
  def field_boundaries(bin)
    offsets = [0]
    pos = 0
    while pos < bin.bytesize
      tag, pos = read_varint(bin, pos)
      case tag & 7
      when 0 then _, pos = read_varint(bin, pos)
      when 1 then pos += 8
      when 2
        len, pos = read_varint(bin, pos)
        pos += len
      when 5 then pos += 4
      end
      offsets << pos
    end
    offsets
  end

  def read_varint(bin, pos)
    value = 0
    shift = 0
    loop do
      byte = bin.getbyte(pos)
      pos += 1
      value |= (byte & 0x7f) << shift
      return [value, pos] if byte < 0x80

      shift += 7
    end
  end

  def flip(bin, rng)
    return rng.bytes(4) if bin.empty?

    out = bin.dup
    rng.rand(1..3).times { i = rng.rand(out.bytesize); out.setbyte(i, out.getbyte(i) ^ (1 << rng.rand(8))) }
    out
  end
end
