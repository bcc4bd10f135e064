# frozen_string_literal: true

require_relative "spec_helper"
require "json"
require "tmpdir"

# proto3 JSON of flowctl.v1 (the official gem's classes: spec/gen/official_v1, looked up in
# its pool by name, never as Flowctl::V1 constants) and of spec/fixtures/json/alltypes.proto,
# which has every scalar type, every map key type, proto3 `optional`, a oneof, enums with a
# negative value, Timestamp and Empty: loaded at run time into Flowctl and into
# google-protobuf's pool. Random messages go to google-protobuf through the binary format
# (tested elsewhere), and both JSON texts must agree byte for byte, maps of many entries
# included; each side reads the other's text to the same message.
RSpec.describe "proto3 JSON of flowctl.v1 and of every field type" do
  include MessageHelpers

  JSON_V1_FIXTURES = File.expand_path("fixtures", __dir__)
  OFFICIAL_V1 = File.expand_path("gen/official_v1", __dir__)
  JSONTEST = Module.new # where alltypes.proto's classes go

  def self.alltypes_set
    @alltypes_set ||= begin
      out = File.join(Dir.mktmpdir("flowctl-json"), "alltypes.pb")
      system("protoc", "-I#{JSON_V1_FIXTURES}", "-I/usr/include", "--include_imports", "--descriptor_set_out=#{out}",
             File.join(JSON_V1_FIXTURES, "json/alltypes.proto")) or raise "protoc failed on json/alltypes.proto"
      File.binread(out)
    end
  end

  def self.alltypes
    @alltypes ||= Flowctl.load_descriptor_set(alltypes_set, root: JSONTEST)
  end

  def self.wkt_set
    @wkt_set ||= begin
      out = File.join(Dir.mktmpdir("flowctl-json"), "wkt.pb")
      system("protoc", "-I#{JSON_V1_FIXTURES}", "-I/usr/include", "--include_imports", "--descriptor_set_out=#{out}",
             File.join(JSON_V1_FIXTURES, "json/wkt.proto")) or raise "protoc failed on json/wkt.proto"
      File.binread(out)
    end
  end

  def self.known
    @known ||= Flowctl.load_descriptor_set(wkt_set, root: JSONTEST).fetch("jsontest.wkt.v1.Known")
  end

  before(:all) do
    Official.load!
    $LOAD_PATH.unshift(OFFICIAL_V1) unless $LOAD_PATH.include?(OFFICIAL_V1)
    %w[common control_plane source processor consumer].each { |f| require "official_flowctl/v1/#{f}_pb" }
    require "google/protobuf/empty_pb"
    pool = Google::Protobuf::DescriptorPool.generated_pool
    %w[any duration field_mask struct wrappers].each { |f| require "google/protobuf/#{f}_pb" }
    self.class.alltypes # loaded here, not inside an example (GC_STRESS=1 runs examples under GC.stress)
    self.class.known
    { "jsontest.v1.Scalars" => self.class.alltypes_set, "jsontest.wkt.v1.Known" => self.class.wkt_set }.each do |name, set|
      next if pool.lookup(name)

      Flowctl::Protobuf::FileDescriptorSet.decode(set).file.each do |f|
        pool.add_serialized_file(f.to_proto) unless f.name.start_with?("google/protobuf/")
      end
    end
  end

  def official(klass) = Google::Protobuf::DescriptorPool.generated_pool.lookup(klass.descriptor_name).msgclass

  def jt(name) = self.class.alltypes.fetch("jsontest.v1.#{name}")

  V1_CLASSES = Flowctl::V1.constants.map { |c| Flowctl::V1.const_get(c) }.select { |k| k.is_a?(Class) && k < Flowctl::Message }

  # ---- random messages from the reflection API -------------------------------------

  INTS = {
    int32: [0, 1, -1, 2**31 - 1, -2**31], sint32: [0, -1, 2**31 - 1, -2**31], sfixed32: [0, -1, 2**31 - 1, -2**31],
    uint32: [0, 1, 2**32 - 1], fixed32: [0, 2**32 - 1],
    int64: [0, -1, 2**53 + 1, 2**63 - 1, -2**63], sint64: [0, -1, 2**63 - 1, -2**63], sfixed64: [0, 2**63 - 1, -2**63],
    uint64: [0, 1, 2**53 + 1, 2**64 - 1], fixed64: [0, 2**64 - 1]
  }.freeze
  # Not FLT_MAX: upb prints it as 3.40282347e+38 and then refuses to read that back (a
  # double above FLT_MAX); Flowctl prints the same and reads it (see "the float range").
  FLOATS = [0.0, -0.0, 0.1, 1.5, -2.5e-10, 3.4028232635611926e38, -3.4028232635611926e38, 1.401298464324817e-45,
            1.1754943508222875e-38, 16_777_217.0, Float::NAN, Float::INFINITY, -Float::INFINITY, 123_456.789].freeze

  def random_scalar(f, type, rng, depth)
    case type
    when :string then random_string(rng)
    when :bytes then random_bytes(rng, 12)
    when :bool then rng.rand < 0.5
    when :double then random_double(rng)
    when :float then rng.rand < 0.6 ? FLOATS.sample(random: rng) : (rng.rand - 0.5) * 10**rng.rand(-30..30)
    when :enum then rng.rand < 0.85 ? f.enum_values.keys.sample(random: rng) : [7, -5, 2**31 - 1].sample(random: rng)
    when :message
      return random_time(rng) || Time.at(0) if f.timestamp?
      return nil if depth > 2

      random_message(f.message_class, rng, depth + 1)
    else
      range = Flowctl::ProtoJSON::INT_RANGES.fetch(type)
      rng.rand < 0.5 ? INTS.fetch(type).sample(random: rng) : rng.rand(range)
    end
  end

  def random_field(f, rng, depth, max_entries)
    case f.label
    when :singular then random_scalar(f, f.type, rng, depth)
    when :repeated then Array.new(rng.rand(0..3)) { random_scalar(f, f.type, rng, depth) }.compact
    else
      Array.new(rng.rand(0..max_entries)) do
        key = f.key_type == :string ? random_string(rng, 4) : random_scalar(f, f.key_type, rng, depth)
        [key, random_scalar(f, f.type, rng, depth)]
      end.to_h.compact
    end
  end

  def random_message(klass, rng, depth = 0, max_entries: 1)
    values = klass.descriptor.fields.each_with_object({}) do |f, h|
      next if rng.rand < 0.35

      v = random_field(f, rng, depth, max_entries)
      h[f.name] = v unless v.nil?
    end
    klass.new(**values)
  end

  # ---- comparisons ---------------------------------------------------------------------

  # Values of a message with NaN and -0.0 made comparable.
  def canon(v)
    case v
    when Flowctl::Message then canon(v.to_h)
    when Hash then v.to_h { |k, x| [canon(k), canon(x)] }
    when Array then v.map { |x| canon(x) }
    when Float then v.nan? ? :nan : [v].pack("G")
    when Time then [v.to_i, v.nsec]
    else v
    end
  end

  def from_official(klass, msg) = klass.decode(official(klass).encode(msg))

  def check(klass, msg, label)
    text = msg.to_json
    theirs_msg = official(klass).decode(msg.to_proto)
    theirs = official(klass).encode_json(theirs_msg)
    expect(text).to eq(theirs), "#{label}: text differs from google-protobuf"
    expect(canon(from_official(klass, official(klass).decode_json(text)))).to eq(canon(msg)), "#{label}: upb reads ours"
    expect(canon(klass.decode_json(theirs))).to eq(canon(msg)), "#{label}: we read upb's"
    %i[emit_defaults preserve_proto_fieldnames].each do |opt|
      ours = klass.encode_json(msg, opt => true)
      ref = official(klass).encode_json(theirs_msg, opt => true)
      expect(ours).to eq(ref), "#{label} #{opt}"
      expect(canon(klass.decode_json(ours))).to eq(canon(msg)), "#{label} #{opt}: read back"
    end
  end

  describe "flowctl.v1" do
    it "has a google-protobuf twin of every message" do
      expect(V1_CLASSES.size).to be >= 20
      V1_CLASSES.each { |k| expect(official(k).descriptor.map(&:json_name)).to eq(k.descriptor.map(&:json_name)), k.name }
    end

    V1_CLASSES.each do |klass|
      it "#{klass.name}: random messages print as google-protobuf prints them and read back both ways" do
        rng = Random.new(klass.name.sum)
        scaled(40, 4).times { |i| check(klass, random_message(klass, rng), "#{klass.name} #{i}") }
        scaled(8, 2).times { |i| check(klass, random_message(klass, rng, max_entries: 6), "#{klass.name} many #{i}") }
      end
    end

    it "prints a heartbeat, a component and an event as documented" do
      hb = Flowctl::V1::HeartbeatRequest.new(service_id: "svc-1", status: :HEALTH_STATUS_HEALTHY, metrics: { "rps" => "12" })
      expect(hb.to_json).to eq('{"serviceId":"svc-1","status":"HEALTH_STATUS_HEALTHY","metrics":{"rps":"12"}}')
      info = Flowctl::V1::ComponentInfo.new(id: "sq", type: :COMPONENT_TYPE_PROCESSOR, input_event_types: ["raw"])
      expect(info.to_json).to eq('{"id":"sq","type":"COMPONENT_TYPE_PROCESSOR","inputEventTypes":["raw"]}')
      ev = Flowctl::V1::Event.new(id: "e", payload: "\x00\xFF".b, timestamp: Time.at(1_700_000_000, 120_000_000, :nsec),
                                  stellar_cursor: { ledger_sequence: 2**64 - 1 })
      expect(ev.to_json).to eq('{"id":"e","payload":"AP8=","timestamp":"2023-11-14T22:13:20.120Z",' \
                               '"stellarCursor":{"ledgerSequence":"18446744073709551615"}}')
      expect(Flowctl::V1::Event.new(stellar_cursor: {}).to_json).to eq('{"stellarCursor":{}}')
      expect(Flowctl::Protobuf::Empty.new.to_json).to eq("{}")
      expect(Flowctl::Protobuf::Empty.decode_json("{}")).to eq(Flowctl::Protobuf::Empty.new)
    end

    it "prints an unknown enum number as a number and reads names or numbers" do
      hb = Flowctl::V1::HeartbeatRequest.new(status: 42)
      expect(hb.to_json).to eq('{"status":42}')
      expect(Flowctl::V1::HeartbeatRequest.decode_json('{"status":42}').status).to eq(42)
      expect(Flowctl::V1::HeartbeatRequest.decode_json('{"status":2}').status).to eq(Flowctl::V1::HealthStatus.name(2))
      expect(Flowctl::V1::HeartbeatRequest.decode_json('{"status":"HEALTH_STATUS_HEALTHY"}').status).to eq(:HEALTH_STATUS_HEALTHY)
    end

    it "names the nested field of an error" do
      rr = Flowctl::V1::RegisterRequest
      expect { rr.decode_json('{"component":{"type":"NOPE"}}') }
        .to raise_error(Flowctl::DecodeError, /at component\.type: "NOPE" is not a value of flowctl\.v1\.ComponentType/) { |e|
          expect(e.path).to eq("component.type")
        }
      expect(rr.decode_json('{"component":{"type":"NOPE","id":"x"}}', ignore_unknown_fields: true).component)
        .to eq(Flowctl::V1::ComponentInfo.new(id: "x"))
      expect { Flowctl::V1::Event.decode_json('{"stellarCursor":{"ledgerSequence":"-1"}}') }
        .to raise_error(Flowctl::DecodeError, /stellar_cursor\.ledger_sequence: -1 is out of range for uint64/)
      expect { Flowctl::V1::ComponentStatusResponse.decode_json('{"lastHeartbeat":"yesterday"}') }
        .to raise_error(Flowctl::DecodeError, /at last_heartbeat: invalid timestamp/)
    end
  end

  describe "well-known types (spec/fixtures/json/wkt.proto)" do
    let(:known) { self.class.known }

    [
      '{"duration":"1.5s","durations":["0s","-1.000001s","315576000000s","-315576000000.999999999s","0.000000001s"]}',
      '{"i64":"5","text":"","dbl":"NaN","flag":false,"data":"AP8=","u32":4294967295}',
      '{"i64":null,"text":null}',
      '{"object":{"b":[true,null,"x",{"c":{}},-0.5]}}',
      '{"value":null}', '{"value":1.5}', '{"value":"s"}', '{"value":[]}', '{"value":{"a":[{"b":null}]}}',
      '{"list":[1,"a",null,false]}', '{"values":{"k":null}}',
      '{"mask":"a.bC,d"}', '{"mask":""}',
      '{"any":{"@type":"type.googleapis.com/google.protobuf.Duration","value":"1s"}}',
      '{"any":{"@type":"type.googleapis.com/jsontest.wkt.v1.Known","duration":"2s","value":{"x":1}}}',
      '{"any":{"@type":"type.googleapis.com/google.protobuf.Struct","value":{"y":"z"}}}',
      '{"at":"2020-01-01T00:00:00Z","duration":"3s"}'
    ].each do |text|
      it "reads and prints #{text} as google-protobuf does" do
        ours = known.decode_json(text)
        theirs = official(known).decode_json(text)
        expect(ours.to_json).to eq(official(known).encode_json(theirs))
        expect(canon(known.decode(official(known).encode(theirs)))).to eq(canon(ours))
        expect(canon(known.decode_json(ours.to_json))).to eq(canon(ours))
      end
    end

    it "prints the negative Durations upb 3.21 refuses to print (-0.5s, -3s), and reads -0.5s with its sign" do
      { "-0.5s" => [0, -500_000_000], "-3s" => [-3, 0] }.each do |text, (sec, ns)|
        d = known.decode_json(%({"duration":"#{text}"}))
        expect([d.duration.seconds, d.duration.nanos]).to eq([sec, ns])
        expect(d.to_json).to eq(%({"duration":"#{text == '-0.5s' ? '-0.500s' : text}"}))
        expect { official(known).encode_json(official(known).decode(d.to_proto)) }.to raise_error(Google::Protobuf::ParseError, /bad duration/)
      end
      expect(official(known).decode_json('{"duration":"-0.5s"}').duration.nanos).to eq(500_000_000) # upb drops the sign
    end

    {
      '{"duration":"315576000001s"}' => ["duration", /out of range/],
      '{"duration":"1s2"}' => ["duration", /invalid duration/],
      '{"duration":1}' => ["duration", /duration string/],
      '{"durations":["1s",null]}' => ["durations[1]", /null/],
      '{"i64":"x"}' => ["i64", /expected an integer/],
      '{"mask":"a_b"}' => ["mask", /invalid FieldMask path/],
      '{"any":{"@type":"type.googleapis.com/nope.X"}}' => ["any", /not host\/name of a loaded type/],
      '{"any":{"@type":"google.protobuf.Duration","value":"1s"}}' => ["any", /not host\/name/],
      '{"any":{}}' => ["any", /needs a string "@type"/],
      '{"any":{"@type":"type.googleapis.com/google.protobuf.Duration","seconds":1}}' => ["any", /takes "value"/],
      '{"value":{"a":1e400}}' => ['value["a"]', /out of range/],
      "{\"value\":\"\xFF\"}" => ["value", /invalid UTF-8/],
      "{\"mask\":\"a\xFF\"}" => ["mask", /invalid UTF-8/],
      "{\"any\":{\"@type\":\"\xFF\"}}" => ["any", /not host\/name|UTF-8/]
    }.each do |text, (path, message)|
      it "raises DecodeError at #{path} for #{text.inspect}" do
        expect { known.decode_json(text) }.to raise_error(Flowctl::DecodeError, message) { |e| expect(e.path).to eq(path) }
        next unless text.ascii_only? # upb takes invalid UTF-8 in a Value or FieldMask

        expect { official(known).decode_json(text) }.to raise_error(Google::Protobuf::ParseError)
      end
    end

    it "refuses to print what JSON cannot hold" do
      dur = known.field_info(:duration).message_class
      expect { known.new(duration: dur.new(seconds: 1, nanos: -1)).to_json }.to raise_error(RangeError, /duration: invalid/)
      val = known.field_info(:value).message_class
      expect { known.new(value: val.new).to_json }.to raise_error(ArgumentError, /value: .*no kind/)
      expect { known.new(value: val.new(number_value: Float::NAN)).to_json }.to raise_error(ArgumentError, /cannot hold NaN/)
      any = known.field_info(:any).message_class
      expect { known.new(any: any.new).to_json }.to raise_error(ArgumentError, /any: .*without a type_url/)
      expect { official(known).encode_json(official(known).new(any: Google::Protobuf::Any.new)) }.to raise_error(Google::Protobuf::ParseError)
    end
  end

  describe "every field type (spec/fixtures/json/alltypes.proto)" do
    %w[Scalars Optionals Repeats Maps OneOf Nested Declared].each do |name|
      it "#{name}: random messages agree with google-protobuf both ways" do
        klass = jt(name)
        rng = Random.new(name.sum)
        scaled(60, 5).times { |i| check(klass, random_message(klass, rng), "#{name} #{i}") }
        scaled(10, 2).times { |i| check(klass, random_message(klass, rng, max_entries: 5), "#{name} many #{i}") }
      end
    end

    it "prints proto3 optional and oneof members when set, even to their default" do
      expect(jt("Optionals").new(i32: 0, flag: false, text: "", color: :COLOR_UNSPECIFIED, sub: {}).to_json)
        .to eq('{"i32":0,"flag":false,"text":"","color":"COLOR_UNSPECIFIED","sub":{}}')
      expect(jt("OneOf").new(number: 0).to_json).to eq('{"number":"0"}')
      expect(jt("Scalars").new(weird_Name_2x: "w", nothing: {}).to_json).to eq('{"nothing":{},"weirdName2x":"w"}')
      check(jt("Optionals"), jt("Optionals").new(i32: 0, db: -0.0, fl: 0.0, u64: 0), "defaults")
    end

    it "prints fields in declaration order, by their json_name option" do
      d = jt("Declared").new(alpha: 1, zeta: "z", renamed_field: "r")
      expect(d.to_json).to eq('{"zeta":"z","alpha":1,"customName":"r"}')
      expect(d.to_json).to eq(official(jt("Declared")).encode_json(official(jt("Declared")).decode(d.to_proto)))
      expect(jt("Declared").decode_json('{"customName":"a"}').renamed_field).to eq("a")
      expect(jt("Declared").decode_json('{"renamed_field":"b"}').renamed_field).to eq("b")
      expect { jt("Declared").decode_json('{"customName":"a","renamed_field":"b"}') }
        .to raise_error(Flowctl::DecodeError, /renamed_field: field given twice/) { |e| expect(e.cause).to be_nil }
      expect(jt("Declared").descriptor.map(&:name)).to eq(%i[zeta alpha renamed_field])
      expect(jt("Declared").field_info("customName").name).to eq(:renamed_field)
    end

    it "prints every map key type as a string" do
      m = jt("Maps").new(i32_s: { -1 => "a" }, u64_by: { 2**64 - 1 => "b" }, b_color: { true => :COLOR_RED },
                         sf32_s: { -2**31 => "" })
      expect(m.to_json).to eq('{"i32S":{"-1":"a"},"u64By":{"18446744073709551615":"Yg=="},' \
                              '"bColor":{"true":"COLOR_RED"},"sf32S":{"-2147483648":""}}')
      expect(jt("Maps").decode_json(m.to_json)).to eq(m)
    end

    it "reads numbers as strings, exponents, -0 and the float range" do
      s = jt("Scalars").decode_json('{"i64":"-9223372036854775808","u64":18446744073709551615,"fl":"-0","db":-0,' \
                                    '"i32":1e9,"f64":"1e3","fl2":1}', ignore_unknown_fields: true)
      expect([s.i64, s.u64, s.i32, s.f64]).to eq([-2**63, 2**64 - 1, 1_000_000_000, 1000])
      expect([s.fl, s.db].map { |d| 1 / d }).to eq([-Float::INFINITY, -Float::INFINITY])
      flt_max = 3.4028234663852886e38
      expect(jt("Scalars").new(fl: flt_max).to_json).to eq(official(jt("Scalars")).encode_json(official(jt("Scalars")).new(fl: flt_max)))
      expect(jt("Scalars").decode_json('{"fl":3.40282347e+38}').fl).to eq(flt_max)
      expect(jt("Scalars").decode_json('{"fl":-3.4028235677973362e+38}').fl).to eq(-flt_max)
      expect { jt("Scalars").decode_json('{"fl":3.4028235677973366e+38}') }.to raise_error(Flowctl::DecodeError, /out of range for float/)
    end

    it "reads an exponent's -0 as part of its number in the C reader and the Ruby decoder alike (found by fuzzing)" do
      text = '{"db":1e-0,"fl":-0,"f64":2E-0,"i32":-0}'
      [jt("Scalars").decode_json(text), Flowctl::ProtoJSON.ruby_decode(jt("Scalars"), text)].each do |s|
        expect([s.db, s.f64, s.i32]).to eq([1.0, 2, 0])
        expect(1 / s.fl).to eq(-Float::INFINITY)
      end
    end

    {
      '{"scalars":{"i32":2147483648}}' => ["scalars.i32", /out of range for int32/],
      '{"scalars":{"u32":-1}}' => ["scalars.u32", /out of range for uint32/],
      '{"scalars":{"i64":"9223372036854775808"}}' => ["scalars.i64", /out of range for int64/],
      '{"scalars":{"fl":1e39}}' => ["scalars.fl", /out of range for float/],
      '{"scalars":{"flag":"true"}}' => ["scalars.flag", /expected true or false/],
      '{"scalars":{"color":1.5}}' => ["scalars.color", /not an integer/],
      '{"scalars":{"color":4294967296}}' => ["scalars.color", /out of range for int32/],
      '{"scalars":{"nothing":[]}}' => ["scalars.nothing", /expected an object for google\.protobuf\.Empty/],
      '{"scalars":{"nothing":{"x":1}}}' => ["scalars.nothing", /unknown field "x"/],
      '{"maps":{"sI64":{"x":"y"}}}' => ['maps.s_i64["x"]', /expected an integer/],
      '{"maps":{"i32S":{"1.0":"y"}}}' => ['maps.i32_s["1.0"]', /map key must be an integer/],
      '{"maps":{"bColor":{"yes":"COLOR_RED"}}}' => ['maps.b_color["yes"]', /"true" or "false"/],
      '{"maps":{"u32B":{"4294967296":true}}}' => ['maps.u32_b["4294967296"]', /out of range for uint32/],
      '{"maps":{"sAt":{"a":"2020-01-01"}}}' => ['maps.s_at["a"]', /invalid timestamp/],
      '{"repeats":{"sub":[{},{"i64":[]}]}}' => ["repeats.sub[1].i64", /expected an integer/],
      '{"repeats":{"at":[null]}}' => ["repeats.at[0]", /null/],
      '{"one":{"name":"a","number":1}}' => ["one.number", /one oneof/],
      '{"child":{"child":{"one":{"color":"COLOR_GREEN"}}}}' => ["child.child.one.color", /not a value of jsontest\.v1\.Color/]
    }.each do |text, (path, message)|
      it "raises DecodeError at #{path} for #{text}" do
        expect { jt("Nested").decode_json(text) }.to raise_error(Flowctl::DecodeError, message) { |e| expect(e.path).to eq(path) }
        expect { official(jt("Nested")).decode_json(text) }.to raise_error(Google::Protobuf::ParseError)
      end
    end

    # upb prints a map in the order of its hash table (json_order.c): sizes around each
    # growth of the table (6 of 8 slots, 13 of 16, 27 of 32, 54 of 64, ...), keys of every
    # type, long strings (the hash reads 16 and 64 bytes at a time), one map built twice
    # in two orders.
    describe "map order" do
      def map_keys(type, rng, n)
        keys = Array.new(n * 2) do
          case type
          when :string
            Array.new([0, 1, 3, 4, 8, 9, 16, 17, 64, 65, 200].sample(random: rng)) { ["a", "é", "中", "🎉", rng.rand(32..126).chr].sample(random: rng) }.join
          when :bool then rng.rand < 0.5
          else rng.rand < 0.3 ? INTS.fetch(type).sample(random: rng) : rng.rand(Flowctl::ProtoJSON::INT_RANGES.fetch(type))
          end
        end
        keys.uniq.first(n)
      end

      sizes = [0, 1, 2, 5, 6, 7, 12, 13, 14, 26, 27, 28, 53, 54, 55, 108, 109, 300]
      sizes = [7] if MessageHelpers::STRESS
      sizes.each do |n|
        it "prints maps of #{n} entries of every key type byte for byte as google-protobuf does" do
          klass = jt("Maps")
          rng = Random.new(n)
          fields = klass.descriptor.select(&:map?)
          fields = fields.sample(2, random: rng) if MessageHelpers::STRESS # a check takes ~30 s under GC.stress
          fields.each do |f|
            (MessageHelpers::STRESS ? 1 : 2).times do |round|
              entries = map_keys(f.key_type, rng, n).to_h { |k| [k, random_scalar(f, f.type, rng, 2)] }
              entries = entries.to_a.reverse.to_h if round == 1
              msg = klass.new(f.name => entries)
              check(klass, msg, "#{f.name} #{n} entries, round #{round}")
              expect(msg.to_json).to eq(Flowctl::ProtoJSON::Encoder.new({}).encode(msg)), "#{f.name}: the C and Ruby printers"
            end
          end
        end
      end

      it "prints a Struct's fields (printed by the Ruby encoder) in google-protobuf's order" do
        known = self.class.known
        rng = Random.new(5)
        (MessageHelpers::STRESS ? [7] : [2, 7, 14, 40]).each do |n|
          text = "{#{map_keys(:string, rng, n).map { |k| "#{JSON.generate(k)}:#{rng.rand(100)}" }.join(',')}}"
          ours = known.decode_json(%({"object":#{text},"values":#{text}}))
          expect(ours.to_json).to eq(official(known).encode_json(official(known).decode(ours.to_proto))), "#{n} fields"
        end
      end

      it "follows the order the entries were added in, as upb does" do
        klass = jt("Maps")
        keys = %w[a b c d e f g h i j]
        forward = klass.new(s_i64: keys.to_h { |k| [k, 1] })
        backward = klass.new(s_i64: keys.reverse.to_h { |k| [k, 1] })
        expect(JSON.parse(forward.to_json)["sI64"].keys).to eq(%w[i d a f c j e h b g])
        expect(JSON.parse(backward.to_json)["sI64"].keys).to eq(%w[i d a f c j h e b g])
        check(klass, forward, "forward")
        check(klass, backward, "backward")
      end
    end

    it "prints random messages of every class the same from C and from the Ruby encoder, with every option" do
      rng = Random.new(99)
      classes = V1_CLASSES + %w[Scalars Optionals Repeats Maps OneOf Nested Declared].map { |n| jt(n) }
      classes = classes.sample(3, random: rng) if MessageHelpers::STRESS
      options = [{}, { emit_defaults: true }, { preserve_proto_fieldnames: true }, { format_enums_as_integers: true }]
      classes.each do |klass|
        scaled(20, 1).times do
          msg = random_message(klass, rng, max_entries: 8)
          options.each do |opts|
            expect(klass.encode_json(msg, opts)).to eq(Flowctl::ProtoJSON::Encoder.new(opts).encode(msg)), "#{klass} #{opts}"
          end
        end
      end
    end

    # json_read.c reads plain text in C and leaves everything else to the Ruby decoder:
    # what it reads must be what the Ruby decoder reads, on printed texts and on broken ones.
    def c_read(klass, text)
      loop do
        out = Flowctl::Native.json_decode(klass, text)
        return out unless out.is_a?(Class)

        Flowctl::ProtoJSON.plan(out)
      end
    end

    def ruby_read(klass, text, ignore)
      Flowctl::ProtoJSON.ruby_decode(klass, text, ignore)
    rescue Flowctl::DecodeError
      :rejected
    end

    MUTATIONS = ["", " ", ",", "}", "]", "{", "[", "\"", ":", "null", "-0", "1e3", "\\u00e9", "\\n", "\xFF",
                 "\"NaN\"", "true", "==", "T", "Z", "+01:00", "9999999999999999999999"].freeze

    it "reads in C exactly what the Ruby decoder reads, printed or broken" do
      rng = Random.new(77)
      classes = V1_CLASSES + %w[Scalars Optionals Repeats Maps OneOf Nested Declared].map { |n| jt(n) }
      classes = classes.sample(3, random: rng) if MessageHelpers::STRESS
      read_in_c = printed = 0
      classes.each do |klass|
        scaled(25, 1).times do
          msg = random_message(klass, rng, max_entries: 4)
          texts = [msg.to_json, klass.encode_json(msg, preserve_proto_fieldnames: true),
                   klass.encode_json(msg, emit_defaults: true), official(klass).encode_json(official(klass).decode(msg.to_proto))]
          texts += Array.new(6) do
            t = texts.sample(random: rng).b
            at = rng.rand(0..t.size)
            cut = rng.rand(0..2)
            (t[0, at] + MUTATIONS.sample(random: rng).b + (t[at + cut..] || "")).force_encoding(Encoding::UTF_8)
          end
          texts.each_with_index do |text, i|
            ours = c_read(klass, text)
            printed += 1 if i < 4
            next if ours.nil?

            read_in_c += 1 if i < 4
            [false, true].each do |ignore|
              theirs = ruby_read(klass, text, ignore)
              expect(theirs).not_to eq(:rejected), "C read what Ruby rejects (ignore #{ignore}): #{text.inspect[0, 300]}"
              expect(canon(ours)).to eq(canon(theirs)), "#{klass} #{text.inspect[0, 300]}"
            end
            strings = klass.descriptor.map { |f| ours[f.name] }.grep(String)
            expect(strings).to all(be_frozen)
            expect(klass.new(**ours.to_h)).to eq(ours) unless ours.inspect.include?("NaN")
          end
        end
      end
      warn "read in C: #{read_in_c} of #{printed}" if ENV["JSON_DEBUG"]
      expect(read_in_c).to be > printed / 2 # most printed texts are read in C
    end

    it "describes the fields of a loaded class" do
      f = jt("Maps").field_info(:s32_sub)
      expect([f.label, f.key_type, f.type, f.type_name, f.message_class]).to eq([:map, :sint32, :message, "jsontest.v1.Scalars", jt("Scalars")])
      c = jt("Scalars").field_info("color")
      expect([c.enum_values, c.enum_module]).to eq([{ COLOR_UNSPECIFIED: 0, COLOR_RED: 1, COLOR_BLUE: 2, COLOR_NEGATIVE: -1 },
                                                   self.class.alltypes.fetch("jsontest.v1.Color")])
      expect(Flowctl::V1::HeartbeatRequest.field_info(:status).enum_module).to equal(Flowctl::V1::HealthStatus)
      expect(jt("OneOf").descriptor.map(&:oneof).uniq.size).to eq(1)
      expect(jt("OneOf").descriptor.all?(&:has_presence?)).to be(true)
      expect(jt("Optionals").field_info(:i32).has_presence?).to be(true)
      expect(jt("Scalars").field_info(:i32).has_presence?).to be(false)
      expect(jt("Scalars").field_info("weirdName2x").name).to eq(:weird_Name_2x)
    end
  end
end
