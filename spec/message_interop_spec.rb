# frozen_string_literal: true

require_relative "spec_helper"

# Bytes from Flowctl decode with the official google-protobuf gem (classes protoc generated
# from the same proto/ files, spec/gen) to the same values, and the other way round, for
# every message. Where no map has more than one entry the bytes are identical to
# google-protobuf's (map order is unspecified, so larger maps compare by value).
RSpec.describe "Flowctl messages interoperate with google-protobuf" do
  include MessageHelpers

  before(:all) { Official.load! }

  # Flowctl -> bytes -> official, and official -> bytes -> Flowctl, with exact comparisons.
  def check_both_ways(klass, values, label)
    expected = canon_input(klass, values)
    ours = klass.new(**values)
    official = official_message(klass, values)
    expect(canon_official(klass, official)).to eq(expected), "#{label}: the official message itself (test bug)"

    bin = ours.to_proto
    expect(bin.encoding).to eq(Encoding::BINARY)
    decoded = official_class(klass).decode(bin)
    expect(canon_official(klass, decoded)).to eq(expected), "#{label}: Flowctl bytes read by google-protobuf"

    theirs = official_class(klass).encode(official)
    back = klass.decode(theirs)
    expect(back).to be_a(klass)
    expect(canon_flowctl(back)).to eq(expected), "#{label}: google-protobuf bytes read by Flowctl"

    return unless deterministic?(klass, values)

    expect(bin.unpack1("H*")).to eq(theirs.unpack1("H*")), "#{label}: bytes differ from google-protobuf"
  end

  MessageHelpers::EXPECTED_CLASSES.each_key do |class_name|
    describe class_name do
      let(:klass) { Object.const_get(class_name) }

      it "has the same fields as the official class" do
        expect(klass.fields).to eq(official_class(klass).descriptor.map { |f| f.name.to_sym })
      end

      it "agrees on the empty message" do
        check_both_ways(klass, {}, "empty")
        expect(klass.new.to_proto).to eq(official_class(klass).encode(official_class(klass).new))
      end

      it "agrees on random values with maps of at most one entry, byte for byte" do
        rng = Random.new(class_name.sum)
        scaled(60, 6).times do |i|
          values = random_values(klass, rng, max_entries: 1)
          check_both_ways(klass, values, "random #{i} #{values.inspect[0, 300]}")
        end
      end

      it "agrees on random values with many map entries" do
        rng = Random.new(class_name.sum + 1)
        scaled(20, 3).times do |i|
          values = random_values(klass, rng, max_entries: 40)
          check_both_ways(klass, values, "random #{i}")
        end
      end

      it "agrees on every field set to its edge values one at a time" do
        fields_of(klass).each do |f|
          values = edge_values(f.kind)
          values = values.first(2) + values.last(1) if MessageHelpers::STRESS
          values.each_with_index do |v, i|
            check_both_ways(klass, { f.name => v }, "#{f.name} edge #{i}: #{v.inspect[0, 80]}")
          end
        end
      end

      it "agrees on large values" do
        fields_of(klass).each do |f|
          check_both_ways(klass, { f.name => large_value(f.kind) }, "#{f.name} large")
        end
      end
    end
  end

  describe "known bytes" do
    it "encodes a heartbeat exactly as protoc-generated code does" do
      hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest
      msg = hb.new(processor_id: "p1", timestamp: Time.at(1_700_000_000, 500, :nsec), metrics: { "rps" => 1.5 }, status: "HEALTHY")
      off = Obsrvr::Flow::Controlplane::ProcessorHeartbeatRequest.new(
        processor_id: "p1", timestamp: Google::Protobuf::Timestamp.new(seconds: 1_700_000_000, nanos: 500),
        metrics: { "rps" => 1.5 }, status: "HEALTHY"
      )
      expect(msg.to_proto).to eq(Obsrvr::Flow::Controlplane::ProcessorHeartbeatRequest.encode(off))
    end

    it "writes both key and value of a map entry even when they are empty or zero, as protoc code does" do
      hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest
      dm = Flowctl::Processor::DataMessage
      # 1a 0c | 0a 01 'k' | 11 00*8   (value 0.0 written)
      expect(hb.new(metrics: { "k" => 0.0 }).to_proto.unpack1("H*")).to eq("1a0c0a016b110000000000000000")
      # 1a 0b | 0a 00 | 11 <1.0>     (empty key written)
      expect(hb.new(metrics: { "" => 1.0 }).to_proto.unpack1("H*")).to eq("1a0b0a0011000000000000f03f")
      # -0.0 keeps its sign bit
      expect(hb.new(metrics: { "k" => -0.0 }).to_proto.unpack1("H*")).to eq("1a0c0a016b110000000000000080")
      # 12 04 | 0a 00 | 12 00
      expect(dm.new(metadata: { "" => "" }).to_proto.unpack1("H*")).to eq("12040a001200")
    end

    it "keeps -0.0 and NaN in map values through a round trip" do
      hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest
      back = hb.decode(hb.new(metrics: { "neg" => -0.0, "nan" => Float::NAN }).to_proto).metrics
      expect(canon_double(back["neg"])).to eq(canon_double(-0.0))
      expect(back["nan"]).to be_nan
    end

    it "decodes a 1 MiB payload from google-protobuf" do
      payload = Random.new(5).bytes(1 << 20)
      bin = Obsrvr::Flow::Processor::DataMessage.encode(Obsrvr::Flow::Processor::DataMessage.new(payload: payload))
      expect(Flowctl::Processor::DataMessage.decode(bin).payload).to eq(payload)
    end
  end

  # Values at the edges of each field kind.
  def edge_values(kind)
    strings = ["", "a", "\0", "a\0b", "中文 🎉 \u{10FFFF}", "é" * 100, "x" * 127, "y" * 128, "\r\n\t"]
    case kind
    when :string then strings
    when :bytes then ["".b, "\0".b, "\xFF\xFE\xFD".b, (0..255).map(&:chr).join.b, "é".b]
    when :int32 then MessageHelpers::EXTREME_INT32
    when :bool then [true, false]
    when :timestamp then MessageHelpers::EXTREME_TIMES + [nil]
    when :repeated_string then [[], [""], strings, ["same"] * 50]
    when :map_string then [{}, { "" => "" }, { "k" => "" }, { "" => "v" }, { "\0" => "\0" }, { "中" => "🎉" }, strings.to_h { |s| [s, s] }]
    when :map_double
      [{}, { "" => 0.0 }] + MessageHelpers::EXTREME_DOUBLES.map { |d| { "d" => d } } +
        [MessageHelpers::EXTREME_DOUBLES.each_with_index.to_h { |d, i| ["d#{i}", d] }]
    else raise "no edge values for #{kind}"
    end
  end

  # Large values: 1 MiB bytes and strings, thousands of map entries and repeated elements.
  def large_value(kind)
    case kind
    when :string then "ü€" * (1 << 17)
    when :bytes then Random.new(1).bytes(1 << 20)
    when :int32 then -1
    when :bool then true
    when :timestamp then Time.at(253_402_300_799, 999_999_999, :nsec)
    when :repeated_string then Array.new(scaled(5000, 100)) { |i| "type-#{i}" }
    when :map_string then (1..scaled(3000, 100)).to_h { |i| ["key-#{i}", "välue-#{i}" * (i % 5)] }
    when :map_double then (1..scaled(3000, 100)).to_h { |i| ["m#{i}", i * 0.5 - 700.25] }
    end
  end
end
