# frozen_string_literal: true

require_relative "spec_helper"
require "json"

# proto3 JSON (lib/flowctl/json.rb) against google-protobuf 3.21's encode_json/decode_json
# with the classes protoc generated from the same protos (spec/gen): the same text byte for
# byte (maps of many entries too: Flowctl prints a map in the order of upb's hash table,
# json_order.c), the same values both ways.
RSpec.describe "proto3 JSON" do
  include MessageHelpers

  before(:all) { Official.load! }

  def official_json(klass, values, **opts)
    official_class(klass).encode_json(official_message(klass, values), **opts)
  end

  def check_json(klass, values, label)
    expected = canon_input(klass, values)
    ours = klass.new(**values)
    text = ours.to_json
    expect(text.encoding).to eq(Encoding::UTF_8)
    theirs = official_json(klass, values)
    expect(text).to eq(theirs), "#{label}: text differs from google-protobuf"
    expect(canon_official(klass, official_class(klass).decode_json(text))).to eq(expected), "#{label}: read by google-protobuf"
    back = klass.decode_json(theirs)
    expect(canon_flowctl(back)).to eq(expected), "#{label}: google-protobuf's JSON read by Flowctl"
  end

  MessageHelpers::EXPECTED_CLASSES.each_key do |class_name|
    describe class_name do
      let(:klass) { Object.const_get(class_name) }

      it "prints the empty message as {} and reads it back" do
        expect(klass.new.to_json).to eq("{}")
        expect(klass.decode_json("{}")).to eq(klass.new)
        expect(official_json(klass, {})).to eq("{}")
      end

      it "prints random values as google-protobuf does, byte for byte with maps of at most one entry" do
        rng = Random.new(class_name.sum + 7)
        scaled(60, 6).times do |i|
          values = random_values(klass, rng, max_entries: 1)
          check_json(klass, values, "random #{i} #{values.inspect[0, 300]}")
        end
      end

      it "prints random values with many map entries byte for byte as google-protobuf does" do
        rng = Random.new(class_name.sum + 8)
        scaled(15, 2).times { |i| check_json(klass, random_values(klass, rng, max_entries: 20), "random #{i}") }
      end

      it "prints with google-protobuf's options the same text" do
        rng = Random.new(class_name.sum + 9)
        [{}, random_values(klass, rng, max_entries: 1)].each do |values|
          opts_list = [{ emit_defaults: true }, { preserve_proto_fieldnames: true },
                       { emit_defaults: true, preserve_proto_fieldnames: true }]
          opts_list.each do |opts|
            expect(klass.encode_json(klass.new(**values), opts)).to eq(official_json(klass, values, **opts)), opts.inspect
          end
        end
      end
    end
  end

  describe "values at the edges" do
    hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest

    it "prints doubles, NaN and infinities as upb does" do
      doubles = MessageHelpers::EXTREME_DOUBLES + [0.1, 0.30000000000000004, 1e20, 1e-7, 1e15, 1e16, 123_456_789.0,
                                                   2.0**53 + 2, 1.0 / 3, -1e-300, 9_007_199_254_740_993.0]
      doubles.each { |d| check_json(hb, { metrics: { "d" => d } }, d.inspect) }
    end

    it "prints every control character and quote as upb escapes them" do
      s = (0..127).map(&:chr).join + "é中🎉\u{10FFFF}\u2028"
      check_json(hb, { processor_id: s, status: "\\\"/" }, "escapes")
    end

    it "prints Timestamps with 0, 3, 6 or 9 fractional digits, from year 1 to 9999" do
      times = MessageHelpers::EXTREME_TIMES + [Time.at(1, 1_000_000, :nsec), Time.at(1, 1000, :nsec), Time.at(1, 100, :nsec),
                                               Time.at(1, 120_000_000, :nsec), Time.at(-1, 0, :nsec), Time.utc(2024, 2, 29, 23, 59, 59)]
      times.each { |t| check_json(hb, { timestamp: t }, t.inspect) }
      expect(hb.new(timestamp: Time.at(1_700_000_000, 5_000_000, :nsec)).to_json).to eq('{"timestamp":"2023-11-14T22:13:20.005Z"}')
    end

    it "prints bytes in standard base64 with padding" do
      dm = Flowctl::Processor::DataMessage
      ["\xFF".b, "\xFB\xFF".b, (0..255).map(&:chr).join.b, "".b + "x"].each do |b|
        check_json(dm, { payload: b }, b.inspect[0, 40])
      end
      expect(dm.new(payload: "\xFB\xFF\xFE".b).to_json).to eq('{"payload":"+//+"}')
    end

    it "prints int32 extremes as numbers" do
      cr = Flowctl::Processor::CapabilitiesResponse
      MessageHelpers::EXTREME_INT32.each { |i| check_json(cr, { max_concurrent: i }, i.to_s) }
    end
  end

  describe "JSON.generate and to_json" do
    let(:msg) { Flowctl::ControlPlane::ProcessorHeartbeatRequest.new(processor_id: "p1", metrics: { "cpu" => 0.5 }) }

    it "is the message's JSON, not its inspect string" do
      expect(msg.to_json).to eq('{"processorId":"p1","metrics":{"cpu":0.5}}')
      expect(JSON.generate(msg)).to eq(msg.to_json)
      expect(JSON.dump(msg)).to eq(msg.to_json)
      expect(JSON.generate([msg, { "m" => msg }])).to eq("[#{msg.to_json},{\"m\":#{msg.to_json}}]")
    end

    it "follows a pretty generator's layout" do
      text = JSON.pretty_generate("list" => [msg])
      expect(text).to include("\n")
      expect(JSON.parse(text)).to eq("list" => [JSON.parse(msg.to_json)])
    end

    it "takes encode_json's options as a Hash, and refuses unknown ones" do
      expect(msg.to_json(preserve_proto_fieldnames: true)).to eq('{"processor_id":"p1","metrics":{"cpu":0.5}}')
      expect { msg.to_json(bogus: true) }.to raise_error(ArgumentError, /bogus/)
      expect { Flowctl::Processor::DataMessage.encode_json(msg) }.to raise_error(TypeError, /DataMessage/)
    end

    it "names the field of a map or list filled in place with a value it cannot hold" do
      msg.metrics["bad"] = "x"
      expect { msg.to_json }.to raise_error(TypeError, /metrics\["bad"\]/)
      caps = Flowctl::Processor::CapabilitiesResponse.new
      caps.input_event_types << "ok" << 5
      expect { caps.to_json }.to raise_error(TypeError, /input_event_types\[1\]/)
      dm = Flowctl::Processor::DataMessage.new
      dm.metadata["k"] = "\xFF".b
      expect { dm.to_json }.to raise_error(ArgumentError, /metadata\["k"\].*UTF-8/)
    end

    it "works on a frozen message" do
      expect(msg.freeze.to_json).to eq('{"processorId":"p1","metrics":{"cpu":0.5}}')
    end
  end

  describe "decode_json accepts" do
    hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest
    dm = Flowctl::Processor::DataMessage
    cr = Flowctl::Processor::CapabilitiesResponse

    it "lowerCamelCase and .proto names" do
      expect(hb.decode_json('{"processorId":"a"}').processor_id).to eq("a")
      expect(hb.decode_json('{"processor_id":"a"}').processor_id).to eq("a")
    end

    it "numbers as numbers or strings, integral floats for integers" do
      expect(cr.decode_json('{"maxConcurrent":"12"}').max_concurrent).to eq(12)
      expect(cr.decode_json('{"maxConcurrent":1e2}').max_concurrent).to eq(100)
      expect(cr.decode_json('{"maxConcurrent":-2147483648}').max_concurrent).to eq(-2**31)
      m = hb.decode_json('{"metrics":{"a":"1.5","b":"NaN","c":"-Infinity","d":2,"e":"1e3"}}').metrics
      expect(m.values_at("a", "c", "d", "e")).to eq([1.5, -Float::INFINITY, 2.0, 1000.0])
      expect(m["b"]).to be_nan
    end

    it "null as the default" do
      expect(dm.decode_json('{"payload":null,"metadata":null}')).to eq(dm.new)
      expect(hb.decode_json('{"timestamp":null,"processorId":null}')).to eq(hb.new)
    end

    it "base64 standard and URL-safe, with or without padding" do
      %w[+/8= +/8 -_8= -_8].each { |s| expect(dm.decode_json(%({"payload":"#{s}"})).payload).to eq("\xFB\xFF".b), s }
      expect(dm.decode_json('{"payload":""}').payload).to eq("".b)
      expect(dm.decode_json('{"payload":"YWJj"}').payload).to eq("abc".b)
    end

    it "RFC 3339 with offsets and 1 to 9 fractional digits" do
      t = hb.decode_json('{"timestamp":"2020-01-01T00:00:00.5+01:30"}').timestamp
      expect([t.to_i, t.nsec]).to eq([Time.utc(2019, 12, 31, 22, 30).to_i, 500_000_000])
      t = hb.decode_json('{"timestamp":"1969-12-31T23:59:59.123456789-00:00"}').timestamp
      expect([t.to_i, t.nsec]).to eq([-1, 123_456_789])
      t = hb.decode_json('{"timestamp":"9999-12-31T23:59:59.999999999Z"}').timestamp
      expect([t.to_i, t.nsec]).to eq([253_402_300_799, 999_999_999])
    end

    it "unknown fields when asked to ignore them" do
      expect(cr.decode_json('{"bogus":{"x":[1]},"name":"n"}', ignore_unknown_fields: true)).to eq(cr.new(name: "n"))
      expect(cr.decode_json('{"bogus":1,"bogus":2}', ignore_unknown_fields: true)).to eq(cr.new)
    end

    it "what google-protobuf accepts, to the same message" do
      texts = ['{"payload":"-_8"}', '{"metadata":{"":""}}', '{"payload":"YQ"}']
      texts.each do |s|
        expect(canon_flowctl(dm.decode_json(s))).to eq(canon_official(dm, official_class(dm).decode_json(s))), s
      end
    end
  end

  describe "decode_json raises Flowctl::DecodeError naming the field" do
    hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest
    dm = Flowctl::Processor::DataMessage
    cr = Flowctl::Processor::CapabilitiesResponse
    mt = Flowctl::Common::Metrics
    # What google-protobuf 3.21 (upb) accepts of the texts below: a field given twice, a
    # lone surrogate, an empty text, invalid UTF-8 in a key, a string that is no number in
    # a double, dates past the end of a month, hour 24, offset 24:00.
    UPB_LAX = ['{"processorId":"a","processor_id":"b"}', '{"processorId":"a","processorId":"b"}',
               '{"inputEventTypes":["a"],"name":"n","inputEventTypes":["b"]}', '{"metadata":{"k":"a","k":"b"}}', '{"processorId":"\\ud800x"}', "",
               "{\"metadata\":{\"\xFF\":\"\"}}", '{"metrics":{"x":"abc"}}', '{"timestamp":"2020-02-30T00:00:00Z"}',
               '{"timestamp":"2020-01-01T24:00:00Z"}', '{"timestamp":"2020-01-01T00:00:00+24:00"}'].freeze

    {
      [hb, '{"metrics":{"x":"abc"}}'] => ['metrics["x"]', /expected a number/],
      [mt, '{"values":{"x":true}}'] => ['values["x"]', /expected a number/],
      [hb, '{"metrics":{"x":null}}'] => ['metrics["x"]', /null/],
      [hb, '{"metrics":{"x":1e400}}'] => ['metrics["x"]', /out of range/],
      [hb, '{"metrics":[1]}'] => ["metrics", /expected an object/],
      [hb, '{"processorId":1}'] => ["processor_id", /expected a string/],
      [hb, '{"processorId":"\\ud800x"}'] => [nil, /invalid JSON/],
      [hb, '{"timestamp":"2020-02-30T00:00:00Z"}'] => ["timestamp", /invalid date/],
      [hb, '{"timestamp":"2020-01-01T00:00:00"}'] => ["timestamp", /invalid timestamp/],
      [hb, '{"timestamp":"2020-01-01T00:00:00.1234567890Z"}'] => ["timestamp", /invalid timestamp/],
      [hb, '{"timestamp":"0001-01-01T00:00:00+01:00"}'] => ["timestamp", /outside years 1 to 9999/],
      [hb, '{"timestamp":"2020-01-01T24:00:00Z"}'] => ["timestamp", /invalid date or time/],
      [hb, '{"timestamp":"2020-01-01T00:00:00+24:00"}'] => ["timestamp", /invalid offset/],
      [hb, '{"timestamp":12}'] => ["timestamp", /RFC 3339/],
      [hb, '{"bogus":1}'] => [nil, /unknown field "bogus"/],
      [hb, '{"processorId":"a","processor_id":"b"}'] => ["processor_id", /given twice/],
      [hb, '{"processorId":"a","processorId":"b"}'] => ["processor_id", /given twice/],
      [cr, '{"inputEventTypes":["a"],"name":"n","inputEventTypes":["b"]}'] => ["input_event_types", /given twice/],
      [dm, '{"metadata":{"k":"a","k":"b"}}'] => ["metadata", /map key "k" given twice/],
      [cr, '{"bogus":1,"bogus":2}'] => [nil, /given twice|unknown field/],
      [cr, '{"maxConcurrent":2147483648}'] => ["max_concurrent", /out of range for int32/],
      [cr, '{"maxConcurrent":"99999999999999999999999"}'] => ["max_concurrent", /out of range/],
      [cr, '{"maxConcurrent":1.5}'] => ["max_concurrent", /not an integer/],
      [cr, '{"maxConcurrent":"1.5"}'] => ["max_concurrent", /not an integer/],
      [cr, '{"maxConcurrent":"12 "}'] => ["max_concurrent", /expected an integer/],
      [cr, '{"maxConcurrent":true}'] => ["max_concurrent", /expected an integer/],
      [cr, '{"inputEventTypes":"a"}'] => ["input_event_types", /expected an array/],
      [cr, '{"inputEventTypes":["a",null]}'] => ["input_event_types[1]", /null/],
      [cr, '{"inputEventTypes":["a",2]}'] => ["input_event_types[1]", /expected a string/],
      [dm, '{"payload":"a"}'] => ["payload", /invalid base64/],
      [dm, '{"payload":"YQ="}'] => ["payload", /invalid base64/],
      [dm, '{"payload":"Y Q=="}'] => ["payload", /invalid base64/],
      [dm, '{"payload":"YQ==="}'] => ["payload", /invalid base64/],
      [dm, '{"payload":12}'] => ["payload", /base64/],
      [dm, '{"metadata":{"k":1}}'] => ['metadata["k"]', /expected a string/],
      [dm, "[]"] => [nil, /expected an object/],
      [dm, "null"] => [nil, /expected an object/],
      [dm, '{"payload":'] => [nil, /invalid JSON/],
      [dm, ""] => [nil, /invalid JSON/],
      [dm, "Infinity"] => [nil, /invalid JSON/], # json 2.6 quoted it from before the text (fuzz)
      [dm, "[NaN]"] => [nil, /invalid JSON/],
      [dm, '{"payload":-Infinity}'] => [nil, /invalid JSON/],
      [dm, "{\"payload\":\"\xFF\"}"] => ["payload", /UTF-8/],
      [dm, "{\"metadata\":{\"\xFF\":\"\"}}"] => ["metadata[\"\\xFF\"]", /UTF-8/],
      [dm, ("[" * 200) + ("]" * 200)] => [nil, /nesting/]
    }.each do |(klass, text), (path, message)|
      it "#{klass.name.split("::").last} #{text[0, 60].inspect}" do
        expect { klass.decode_json(text) }.to raise_error(Flowctl::DecodeError, message) { |e| expect(e.path).to eq(path) }
        next if UPB_LAX.include?(text)

        expect { official_class(klass).decode_json(text) }.to raise_error(Google::Protobuf::ParseError)
      end
    end

    it "names the message class and the field in the message" do
      expect { hb.decode_json('{"metrics":{"x":"abc"}}') }
        .to raise_error(Flowctl::DecodeError, /obsrvr\.flow\.controlplane\.ProcessorHeartbeatRequest at metrics\["x"\]/)
    end

    it "refuses what is not a String" do
      expect { dm.decode_json(nil) }.to raise_error(TypeError, /String/)
    end
  end

  describe "reflection" do
    hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest

    it "describes every field from the descriptor the codec uses" do
      d = hb.descriptor
      expect(d.name).to eq("obsrvr.flow.controlplane.ProcessorHeartbeatRequest")
      expect(d.message_class).to eq(hb)
      expect(d.fields.map(&:name)).to eq(hb.fields)
      expect(d.map { |f| [f.name, f.json_name, f.number, f.type, f.label] }).to eq(
        [[:processor_id, "processorId", 1, :string, :singular], [:timestamp, "timestamp", 2, :message, :singular],
         [:metrics, "metrics", 3, :double, :map], [:status, "status", 4, :string, :singular]]
      )
      m = hb.field_info("metrics")
      expect([m.map?, m.repeated?, m.key_type, m.has_presence?]).to eq([true, false, :string, false])
      ts = hb.field_info(:timestamp)
      expect([ts.timestamp?, ts.has_presence?, ts.type_name, ts.message_class]).to eq([true, true, "google.protobuf.Timestamp", nil])
      expect(hb.field_info("processorId")).to equal(hb.field_info(:processor_id))
      expect { hb.field_info(:nope) }.to raise_error(ArgumentError, /no field :nope/)
      expect(d).to be_frozen
    end

    it "agrees with google-protobuf's descriptors on every seed class" do
      message_classes.each do |klass|
        theirs = official_class(klass).descriptor.map { |f| [f.name.to_sym, f.json_name, f.number] }
        expect(klass.descriptor.map { |f| [f.name, f.json_name, f.number] }).to eq(theirs), klass.name
      end
    end

    it "computes json names as protoc does" do
      expect(%w[a_b a__b _a a_1 aB a_b_ ab_c_d].map { |n| Flowctl::FieldDescriptor.json_name_of(n) })
        .to eq(%w[aB aB A a1 aB aB abCD])
    end

    it "raises TypeError for what is not a message class" do
      expect { Flowctl::Native.message_fields(String) }.to raise_error(TypeError, /not a message class/)
      expect { Flowctl::Native.message_fields(1) }.to raise_error(TypeError, /not a message class/)
      expect { Flowctl::Message.descriptor }.to raise_error(TypeError)
    end
  end
end
