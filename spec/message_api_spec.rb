# frozen_string_literal: true

require_relative "spec_helper"

# The Ruby surface of the message classes (DESIGN.md "Messages"): what a developer touches.
RSpec.describe "Flowctl message classes" do
  include MessageHelpers

  let(:reg) { Flowctl::ControlPlane::RegisterProcessorRequest }
  let(:hb) { Flowctl::ControlPlane::ProcessorHeartbeatRequest }
  let(:data) { Flowctl::Processor::DataMessage }
  let(:caps) { Flowctl::Processor::CapabilitiesResponse }
  let(:reg_resp) { Flowctl::ControlPlane::RegisterProcessorResponse }

  describe "the class catalogue" do
    it "defines a class for every message of the seed protos, with its proto full name" do
      MessageHelpers::EXPECTED_CLASSES.each do |ruby_name, proto_name|
        klass = Object.const_get(ruby_name)
        expect(klass).to be_a(Class)
        expect(klass.name).to eq(ruby_name)
        expect(klass.descriptor_name).to eq(proto_name)
      end
    end

    it "defines no other class in the package modules, and no class for map entries" do
      defined = [Flowctl::ControlPlane, Flowctl::Processor, Flowctl::Common].flat_map do |mod|
        mod.constants.map { |c| mod.const_get(c) }.select { |c| c.is_a?(Class) && c.respond_to?(:descriptor_name) }
      end
      expect(defined.map(&:name)).to match_array(MessageHelpers::EXPECTED_CLASSES.keys)
      all_constants = message_classes.flat_map { |k| k.constants.map { |c| "#{k}::#{c}" } } +
                      [Flowctl::ControlPlane, Flowctl::Processor, Flowctl::Common].flat_map { |m| m.constants.map(&:to_s) }
      expect(all_constants.grep(/Entry\z/)).to eq([])
    end

    it "is reachable through Flowctl::Native.message_class by proto name" do
      message_classes.each do |klass|
        expect(Flowctl::Native.message_class(klass.descriptor_name)).to equal(klass)
      end
    end

    it "lists fields in proto field-number order" do
      expect(reg.fields).to eq(%i[processor_id endpoint metadata])
      expect(hb.fields).to eq(%i[processor_id timestamp metrics status])
      expect(data.fields).to eq(%i[payload metadata])
      expect(Flowctl::Processor::CapabilitiesRequest.fields).to eq([])
      expect(caps.fields).to eq(%i[processor_id name description version input_event_types output_event_types max_concurrent])
      expect(Flowctl::Common::Metrics.fields).to eq(%i[values])
      message_classes.each do |klass|
        expect(klass.fields).to eq(fields_of(klass).map(&:name)), "fields of #{klass}"
      end
    end

    it "defines a reader and a writer for every field" do
      message_classes.each do |klass|
        klass.fields.each do |f|
          expect(klass.method_defined?(f)).to be(true), "#{klass}##{f}"
          expect(klass.method_defined?(:"#{f}=")).to be(true), "#{klass}##{f}="
        end
      end
    end
  end

  describe ".new" do
    it "gives the proto3 defaults for every field of every class" do
      message_classes.each do |klass|
        msg = klass.new
        fields_of(klass).each do |f|
          value = msg.public_send(f.name)
          expected = MessageHelpers::DEFAULTS.fetch(f.kind)
          expect(value).to eq(expected), "#{klass}##{f.name} default: #{value.inspect}"
          expect(value.encoding).to eq(Encoding::UTF_8) if f.kind == :string
          expect(value.encoding).to eq(Encoding::BINARY) if f.kind == :bytes
          expect(value).to be_a(Hash) if %i[map_string map_double].include?(f.kind)
          expect(value).to be_a(Array) if f.kind == :repeated_string
        end
      end
    end

    it "takes every field as a keyword" do
      t = Time.at(1_700_000_000, 5, :nsec)
      msg = hb.new(processor_id: "p1", timestamp: t, metrics: { "rps" => 1.5 }, status: "HEALTHY")
      expect(msg.processor_id).to eq("p1")
      expect(msg.timestamp).to eq(t)
      expect(msg.metrics).to eq("rps" => 1.5)
      expect(msg.status).to eq("HEALTHY")
    end

    it "takes a positional Hash of fields as well" do
      msg = reg.new({ processor_id: "p1", metadata: { "k" => "v" } })
      expect(msg.processor_id).to eq("p1")
      expect(msg.metadata).to eq("k" => "v")
      expect(msg).to eq(reg.new(processor_id: "p1", metadata: { "k" => "v" }))
    end

    it "leaves unnamed fields at their defaults" do
      msg = caps.new(name: "n")
      expect([msg.processor_id, msg.version, msg.input_event_types, msg.max_concurrent]).to eq(["", "", [], 0])
    end

    it "copies what it is given: later changes to the caller's String, Hash or Array do not reach the message" do
      id = +"p1"
      meta = { "k" => +"v" }
      types = [+"a"]
      r = reg.new(processor_id: id, metadata: meta)
      c = caps.new(input_event_types: types)
      id << "x"
      meta["k"] << "x"
      meta["z"] = "new"
      types << "b"
      types[0] << "x"
      expect(r.processor_id).to eq("p1")
      expect(r.metadata).to eq("k" => "v")
      expect(c.input_event_types).to eq(["a"])
    end
  end

  describe "string fields" do
    it "store and return UTF-8 text, including NUL and astral characters" do
      s = "pröcessor \0 中文 🎉"
      msg = reg.new(processor_id: s)
      expect(msg.processor_id).to eq(s)
      expect(msg.processor_id.encoding).to eq(Encoding::UTF_8)
      expect(reg.decode(msg.to_proto).processor_id).to eq(s)
    end

    it "accept a binary String whose bytes are valid UTF-8 and return it as UTF-8" do
      msg = reg.new(processor_id: "caf\xC3\xA9".b)
      expect(msg.processor_id).to eq("café")
      expect(msg.processor_id.encoding).to eq(Encoding::UTF_8)
      msg.endpoint = "h\xC3\xB6st:1".b
      expect(msg.endpoint).to eq("höst:1")
      expect(msg.endpoint.encoding).to eq(Encoding::UTF_8)
    end

    it "accept US-ASCII Strings" do
      msg = reg.new(processor_id: "abc".encode(Encoding::US_ASCII))
      expect(msg.processor_id).to eq("abc")
      expect(reg.decode(msg.to_proto).processor_id).to eq("abc")
    end

    it "never store the bytes of a String in another encoding as if they were UTF-8" do
      # Either transcode to UTF-8 or refuse; storing UTF-16 bytes raw would corrupt the wire.
      [["abc".encode(Encoding::UTF_16LE), "abc"], ["\xE9t\xE9".dup.force_encoding(Encoding::ISO_8859_1), "été"]].each do |given, text|
        msg = reg.new
        begin
          msg.processor_id = given
        rescue ArgumentError, EncodingError, TypeError => e
          expect(e.message).to include("processor_id")
          next
        end
        expect(msg.processor_id).to eq(text)
        expect(reg.decode(msg.to_proto).processor_id).to eq(text)
      end
    end

    it "set through writers" do
      msg = reg.new
      msg.processor_id = "a"
      msg.endpoint = "127.0.0.1:9"
      expect([msg.processor_id, msg.endpoint]).to eq(["a", "127.0.0.1:9"])
      msg.processor_id = ""
      expect(msg.processor_id).to eq("")
    end
  end

  describe "bytes fields" do
    it "read back as binary (ASCII-8BIT) Strings with every byte kept" do
      payload = (0..255).map(&:chr).join.b * 4
      msg = data.new(payload: payload)
      expect(msg.payload).to eq(payload)
      expect(msg.payload.encoding).to eq(Encoding::BINARY)
      back = data.decode(msg.to_proto)
      expect(back.payload).to eq(payload)
      expect(back.payload.encoding).to eq(Encoding::BINARY)
    end

    it "accept a UTF-8 String and return its bytes as binary" do
      msg = data.new(payload: "héllo")
      expect(msg.payload).to eq("héllo".b)
      expect(msg.payload.encoding).to eq(Encoding::BINARY)
    end

    it "accept bytes that are not valid UTF-8 whatever the String's encoding" do
      msg = data.new(payload: "\xFF\xFE\x00".dup.force_encoding(Encoding::UTF_8))
      expect(msg.payload).to eq("\xFF\xFE\x00".b)
    end
  end

  describe "int32 and bool fields" do
    it "keep the whole int32 range" do
      [0, 1, -1, 2**31 - 1, -2**31].each do |n|
        msg = caps.new(max_concurrent: n)
        expect(msg.max_concurrent).to eq(n)
        expect(caps.decode(msg.to_proto).max_concurrent).to eq(n)
      end
    end

    it "keep true and false" do
      expect(reg_resp.new(success: true).success).to be(true)
      expect(reg_resp.new(success: false).success).to be(false)
      msg = reg_resp.new(success: true)
      msg.success = false
      expect(reg_resp.decode(msg.to_proto).success).to be(false)
    end
  end

  describe "Timestamp fields" do
    it "read as Time with nanosecond precision kept" do
      t = Time.at(1_700_000_000, 123_456_789, :nsec)
      msg = hb.new(timestamp: t)
      expect(msg.timestamp).to be_a(Time)
      expect(msg.timestamp).to eq(t)
      expect(msg.timestamp.nsec).to eq(123_456_789)
      back = hb.decode(msg.to_proto).timestamp
      expect(back).to be_a(Time)
      expect([back.to_i, back.nsec]).to eq([1_700_000_000, 123_456_789])
    end

    it "keep times before 1970" do
      t = Time.at(-1, 1, :nsec) # 1969-12-31T23:59:59.000000001Z
      back = hb.decode(hb.new(timestamp: t).to_proto).timestamp
      expect([back.to_i, back.nsec]).to eq([-1, 1])
      expect(back).to eq(t)
    end

    it "keep the instant of a Time in any zone" do
      t = Time.new(2024, 2, 29, 23, 30, Rational(15_000_000_001, 1_000_000_000), "+05:30")
      back = hb.decode(hb.new(timestamp: t).to_proto).timestamp
      expect(back).to eq(t)
      expect(back.nsec).to eq(1)
    end

    it "accept nil, which clears the field" do
      msg = hb.new(timestamp: Time.now)
      msg.timestamp = nil
      expect(msg.timestamp).to be_nil
      expect(hb.decode(msg.to_proto).timestamp).to be_nil
    end

    it "distinguish the epoch (a present, empty Timestamp) from nil" do
      msg = hb.new(timestamp: Time.at(0))
      expect(msg.to_proto).to eq("\x12\x00".b)
      expect(hb.decode(msg.to_proto).timestamp).to eq(Time.at(0))
    end
  end

  describe "map fields" do
    it "read as a Hash and accept a Hash" do
      msg = reg.new(metadata: { "a" => "1", "b" => "2" })
      expect(msg.metadata).to be_a(Hash)
      expect(msg.metadata).to eq("a" => "1", "b" => "2")
      msg.metadata = { "c" => "3" }
      expect(msg.metadata).to eq("c" => "3")
      msg.metadata = {}
      expect(msg.metadata).to eq({})
    end

    it "take Integer values for double maps and read them back as Float" do
      msg = hb.new(metrics: { "n" => 3 })
      expect(msg.metrics["n"]).to eql(3.0)
      expect(hb.decode(msg.to_proto).metrics["n"]).to eql(3.0)
    end

    it "are live: changing the Hash read from the message changes the message" do
      msg = hb.new(metrics: { "a" => 1.0 })
      msg.metrics["x"] = 2.5
      msg.metrics.delete("a")
      expect(msg.metrics).to eq("x" => 2.5)
      expect(hb.decode(msg.to_proto).metrics).to eq("x" => 2.5)

      r = reg.new
      r.metadata["k"] = "v"
      expect(reg.decode(r.to_proto).metadata).to eq("k" => "v")
    end

    it "round-trip many entries" do
      meta = (1..scaled(2000, 50)).to_h { |i| ["key-#{i}", "value-#{i}" * (i % 7)] }
      back = data.decode(data.new(metadata: meta).to_proto)
      expect(back.metadata).to eq(meta)
    end

    it "round-trip empty keys and values and zero values" do
      back = hb.decode(hb.new(metrics: { "" => 0.0 }).to_proto)
      expect(back.metrics).to eq("" => 0.0)
      back = data.decode(data.new(metadata: { "" => "" }).to_proto)
      expect(back.metadata).to eq("" => "")
    end
  end

  describe "repeated fields" do
    it "read as an Array and accept an Array" do
      msg = caps.new(input_event_types: %w[a b], output_event_types: [])
      expect(msg.input_event_types).to eq(%w[a b])
      expect(msg.input_event_types).to be_a(Array)
      msg.output_event_types = ["x", "", "ü"]
      expect(caps.decode(msg.to_proto).output_event_types).to eq(["x", "", "ü"])
    end

    it "are live: appending to the Array read from the message changes the message" do
      msg = caps.new(input_event_types: ["a"])
      msg.input_event_types << "b"
      expect(msg.input_event_types).to eq(%w[a b])
      expect(caps.decode(msg.to_proto).input_event_types).to eq(%w[a b])
    end
  end

  describe "#to_proto and .decode" do
    it "returns a binary String" do
      bin = reg.new(processor_id: "p").to_proto
      expect(bin).to be_a(String)
      expect(bin.encoding).to eq(Encoding::BINARY)
      expect(bin).to eq("\x0a\x01p".b)
    end

    it "encodes a message with all defaults as the empty String" do
      message_classes.each { |klass| expect(klass.new.to_proto).to eq("".b), klass.name }
    end

    it "decodes the empty String to the defaults" do
      message_classes.each { |klass| expect(klass.decode("")).to eq(klass.new), klass.name }
    end

    it "round-trips every class with every field set" do
      rng = Random.new(42)
      message_classes.each do |klass|
        scaled(5, 1).times do
          values = random_values(klass, rng)
          msg = klass.new(**values)
          back = klass.decode(msg.to_proto)
          expect(back).to be_a(klass)
          expect(canon_flowctl(back)).to eq(canon_input(klass, values)), "#{klass} #{values.inspect}"
        end
      end
    end

    it "decodes from a String in any encoding by its bytes" do
      bin = reg.new(processor_id: "p").to_proto
      expect(reg.decode(bin.dup.force_encoding(Encoding::UTF_8)).processor_id).to eq("p")
    end

    it "takes the last value of a field that appears twice, and the last value of a repeated map key" do
      expect(reg.decode("\x0a\x01a\x0a\x01b".b).processor_id).to eq("b")
      entry1 = "\x0a\x01k\x12\x01x".b
      entry2 = "\x0a\x01k\x12\x01y".b
      bin = "\x1a#{entry1.bytesize.chr}#{entry1}\x1a#{entry2.bytesize.chr}#{entry2}".b
      expect(reg.decode(bin).metadata).to eq("k" => "y")
    end

    it "skips unknown fields of every wire type" do
      known = reg.new(processor_id: "p", metadata: { "a" => "b" }).to_proto
      unknown = "\x78\x96\x01".b +         # field 15 varint 150
                "\x7a\x03abc".b +          # field 15 length-delimited
                "\x7d\x01\x02\x03\x04".b + # field 15 fixed32
                "\x79#{"\0" * 8}".b        # field 15 fixed64
      expect(reg.decode(unknown + known + unknown)).to eq(reg.new(processor_id: "p", metadata: { "a" => "b" }))
    end

    it "skips unknown groups, nested ones included" do
      group = "\x7b\x08\x01\x83\x01\x08\x02\x84\x01\x7c".b # field 15 { varint, field 16 { varint } }
      expect(reg.decode(group + "\x0a\x01p".b).processor_id).to eq("p")
    end

    it "reads a map entry with its key or value missing as the default" do
      expect(reg.decode("\x1a\x03\x12\x01v".b).metadata).to eq("" => "v")
      expect(reg.decode("\x1a\x03\x0a\x01k".b).metadata).to eq("k" => "")
      expect(hb.decode("\x1a\x03\x0a\x01k".b).metrics).to eq("k" => 0.0)
    end
  end

  describe "Klass.encode and #[]" do
    it "Klass.encode(msg) is msg.to_proto and refuses other objects" do
      msg = reg.new(processor_id: "p", metadata: { "k" => "v" })
      expect(reg.encode(msg)).to eq(msg.to_proto)
      expect { reg.encode(reg_resp.new) }.to raise_error(TypeError)
      expect { reg.encode("x") }.to raise_error(TypeError)
    end

    it "#[] and #[]= read and write fields by name, and refuse unknown names" do
      msg = reg.new
      msg[:processor_id] = "p"
      msg["endpoint"] = "e:1"
      expect([msg[:processor_id], msg["endpoint"]]).to eq(["p", "e:1"])
      expect { msg[:nope] }.to raise_error(ArgumentError, /nope/)
      expect { msg[:processor_id] = 1 }.to raise_error(TypeError, /processor_id/)
    end
  end

  describe "#to_h" do
    it "gives every field by Symbol, with Time for timestamps, Hash for maps, Array for repeated" do
      t = Time.at(1_600_000_000, 42, :nsec)
      expect(hb.new(processor_id: "p", timestamp: t, metrics: { "a" => 1.0 }).to_h)
        .to eq(processor_id: "p", timestamp: t, metrics: { "a" => 1.0 }, status: "")
      expect(reg.new.to_h).to eq(processor_id: "", endpoint: "", metadata: {})
      expect(caps.new(input_event_types: ["x"]).to_h).to eq(
        processor_id: "", name: "", description: "", version: "", input_event_types: ["x"],
        output_event_types: [], max_concurrent: 0
      )
      expect(Flowctl::Processor::CapabilitiesRequest.new.to_h).to eq({})
      expect(hb.new.to_h[:timestamp]).to be_nil
    end

    it "round-trips through .new for every class" do
      rng = Random.new(7)
      message_classes.each do |klass|
        msg = klass.new(**random_values(klass, rng))
        expect(klass.new(**msg.to_h)).to eq(msg)
      end
    end

    it "returns copies: changing the result does not change the message" do
      msg = reg.new(metadata: { "a" => "b" })
      h = msg.to_h
      h[:metadata]["x"] = "y"
      expect(msg.metadata).to eq("a" => "b")
    end
  end

  describe "equality" do
    it "compares by class and field values" do
      a = reg.new(processor_id: "p", metadata: { "a" => "1", "b" => "2" })
      b = reg.new(processor_id: "p", metadata: { "b" => "2", "a" => "1" })
      expect(a).to eq(b)
      expect(a).to eql(b)
      expect(a.hash).to eq(b.hash)
      expect(a).not_to eq(reg.new(processor_id: "p"))
      expect(a).not_to eq(reg.new(processor_id: "q", metadata: { "a" => "1", "b" => "2" }))
      expect(a).not_to eql(reg.new(processor_id: "q"))
    end

    it "tells apart classes with the same fields" do
      a = Flowctl::ControlPlane::ProcessorHeartbeatResponse.new(success: true, message: "m")
      b = Flowctl::ControlPlane::SourceHeartbeatResponse.new(success: true, message: "m")
      expect(a).not_to eq(b)
      expect(a).not_to eql(b)
    end

    it "is false, not an error, against other objects" do
      expect(reg.new == nil).to be(false) # rubocop:disable Style/NilComparison
      expect(reg.new == 1).to be(false)
      expect(reg.new == { processor_id: "" }).to be(false)
      expect(reg.new.eql?("x")).to be(false)
    end

    it "makes messages usable as Hash keys and in Sets" do
      counts = Hash.new(0)
      3.times { counts[hb.new(processor_id: "p", timestamp: Time.at(5, 6, :nsec), metrics: { "x" => 1.0 })] += 1 }
      expect(counts.size).to eq(1)
      expect(counts.values).to eq([3])
      expect(message_classes.map(&:new).uniq.size).to eq(message_classes.size)
    end

    it "sees a decoded message as equal to its original, for every class" do
      rng = Random.new(11)
      message_classes.each do |klass|
        msg = klass.new(**random_values(klass, rng).reject { |_, v| v.is_a?(Hash) && v.values.any? { |x| x.is_a?(Float) && x.nan? } })
        back = klass.decode(msg.to_proto)
        expect(back).to eq(msg), klass.name
        expect(back.hash).to eq(msg.hash), klass.name
      end
    end

    it "compares timestamps to the nanosecond" do
      expect(hb.new(timestamp: Time.at(1, 1, :nsec))).not_to eq(hb.new(timestamp: Time.at(1, 2, :nsec)))
      expect(hb.new(timestamp: nil)).not_to eq(hb.new(timestamp: Time.at(0)))
    end
  end

  describe "#inspect" do
    it "shows the class and every field" do
      expect(reg.new(processor_id: "p1").inspect)
        .to eq('#<Flowctl::ControlPlane::RegisterProcessorRequest processor_id: "p1", endpoint: "", metadata: {}>')
      expect(hb.new.inspect)
        .to eq('#<Flowctl::ControlPlane::ProcessorHeartbeatRequest processor_id: "", timestamp: nil, metrics: {}, status: "">')
      expect(Flowctl::Processor::CapabilitiesRequest.new.inspect).to eq("#<Flowctl::Processor::CapabilitiesRequest>")
    end

    it "shows each value as its own #inspect" do
      msg = data.new(payload: "\x00\xFFab".b, metadata: { "k" => "v\n" })
      expect(msg.inspect).to eq(%(#<Flowctl::Processor::DataMessage payload: "\\x00\\xFFab", metadata: {"k"=>"v\\n"}>))
      rng = Random.new(3)
      message_classes.each do |klass|
        m = klass.new(**random_values(klass, rng))
        body = klass.fields.map { |f| "#{f}: #{m.public_send(f).inspect}" }.join(", ")
        expect(m.inspect).to eq(body.empty? ? "#<#{klass.name}>" : "#<#{klass.name} #{body}>")
      end
    end
  end

  describe "#dup" do
    it "copies deeply enough that changing the copy leaves the original alone" do
      orig = reg.new(processor_id: "p", metadata: { "a" => "b" })
      copy = orig.dup
      expect(copy).to eq(orig)
      expect(copy).not_to equal(orig)
      copy.metadata["x"] = "y"
      copy.processor_id = "q"
      expect(orig.metadata).to eq("a" => "b")
      expect(orig.processor_id).to eq("p")

      c = caps.new(input_event_types: ["a"])
      cc = c.dup
      cc.input_event_types << "b"
      expect(c.input_event_types).to eq(["a"])
    end

    it "gives a writable copy of a frozen message" do
      orig = reg.new(processor_id: "p", metadata: { "a" => "b" }).freeze
      copy = orig.dup
      expect(copy).not_to be_frozen
      copy.metadata["x"] = "y"
      copy.processor_id = "q"
      expect(copy.to_h).to eq(processor_id: "q", endpoint: "", metadata: { "a" => "b", "x" => "y" })
    end
  end

  describe "#freeze" do
    it "freezes the message and its containers" do
      msg = reg.new(processor_id: "p", metadata: { "a" => "b" }).freeze
      expect(msg).to be_frozen
      expect(msg.metadata).to be_frozen
      c = caps.new(input_event_types: ["a"]).freeze
      expect(c.input_event_types).to be_frozen
    end

    it "returns self and still reads, encodes, compares and hashes" do
      msg = hb.new(processor_id: "p", metrics: { "a" => 1.0 }, timestamp: Time.at(9, 9, :nsec))
      expect(msg.freeze).to equal(msg)
      expect(msg.processor_id).to eq("p")
      expect(hb.decode(msg.to_proto)).to eq(msg)
      expect(msg.to_h[:metrics]).to eq("a" => 1.0)
      expect(msg.hash).to eq(msg.dup.hash)
      expect(msg.inspect).to include('processor_id: "p"')
    end
  end

  describe "Flowctl::Common::HealthStatus" do
    let(:hs) { Flowctl::Common::HealthStatus }

    it "has a constant per value" do
      expect([hs::UNKNOWN, hs::STARTING, hs::HEALTHY, hs::UNHEALTHY, hs::STOPPING]).to eq([0, 1, 2, 3, 4])
      expect(hs::HEALTHY).to eq(2)
    end

    it "maps numbers to names and names to numbers" do
      expect(hs.name(2)).to eq(:HEALTHY)
      expect(hs.name(0)).to eq(:UNKNOWN)
      expect(hs.value(:HEALTHY)).to eq(2)
      expect(hs.value("HEALTHY")).to eq(2)
      expect(hs.value(:STOPPING)).to eq(4)
      %i[UNKNOWN STARTING HEALTHY UNHEALTHY STOPPING].each { |n| expect(hs.name(hs.value(n))).to eq(n) }
    end

    it "gives nil for an unknown number and raises ArgumentError naming an unknown name" do
      expect(hs.name(99)).to be_nil
      expect(hs.name(-1)).to be_nil
      expect { hs.value(:NOPE) }.to raise_error(ArgumentError, /NOPE/)
      expect { hs.value("healthy") }.to raise_error(ArgumentError, /healthy/)
    end
  end
end
