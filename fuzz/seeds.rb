# frozen_string_literal: true

# Writes the seed corpus of fuzz/ (run from the repository root after `rake compile`):
#   fuzz/corpus/decode/*   one byte picking the message class (index in the classes sorted
#                          by full proto name, as decode_target.c sorts them) + a real encoding
#   fuzz/corpus/convert/*  byte programs for convert_target.c (see the opcode table there)
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require "digest"
require "fileutils"

module FuzzSeeds
  DIR = File.expand_path("corpus", __dir__)

  def self.classes
    Flowctl::PACKAGES.values.flat_map do |mod|
      mod.constants.map { |c| mod.const_get(c) }.select { |k| k.is_a?(Class) && k < Flowctl::Message }
    end.sort_by(&:descriptor_name)
  end

  SAMPLES = {
    processor_id: ["p-1", "процессор", ""], source_id: ["src"], consumer_id: ["c"],
    endpoint: ["127.0.0.1:50051", "dns:///host:443"], message: ["ok", "not registered"],
    metadata: [{ "k" => "v", "ключ" => "значение" }, {}], metrics: [{ "cpu" => 0.5, "nan" => Float::NAN, "neg" => -1e300 }],
    values: [{ "a" => 1.0, "b" => -0.0 }], status: ["HEALTHY", "STOPPING"], success: [true, false],
    timestamp: [Time.at(1_700_000_000, 123_456_789, :nsec), Time.at(0), Time.at(-62_135_596_800)],
    payload: ["\x00\xFF\xFEbinary".b, ""], name: ["ttp"], description: ["d"], version: ["1.0.0"],
    input_event_types: [%w[a b], []], output_event_types: [["x" * 300]], max_concurrent: [0, -1, 2_147_483_647]
  }.freeze

  def self.write(dir, bytes)
    FileUtils.mkdir_p(dir)
    File.binwrite(File.join(dir, Digest::SHA1.hexdigest(bytes)), bytes)
  end

  def self.decode_seeds
    classes.each_with_index do |k, i|
      3.times do |n|
        fields = k.fields.to_h { |f| [f, SAMPLES.fetch(f).then { |v| v[n % v.size] }] }
        write(File.join(DIR, "decode"), i.chr.b + k.new(**fields).to_proto)
      end
      write(File.join(DIR, "decode"), i.chr.b)
    end
  end

  # json_target reads: one byte picking the class (fuzz/json_classes.rb), then JSON text:
  # random messages of each class as both texts encode_json can print, and a few by hand.
  def self.json_seeds
    require_relative "json_classes"
    dir = File.join(DIR, "json")
    rng = Random.new(1)
    FuzzJSON.pairs.each_with_index do |(k, _), i|
      2.times do
        msg = k.new(**k.descriptor.fields.to_h { |f| [f.name, json_sample(f, rng)] }.compact)
        write(dir, i.chr.b + msg.to_json.b)
        write(dir, i.chr.b + k.encode_json(msg, preserve_proto_fieldnames: true, emit_defaults: true).b)
      rescue TypeError, ArgumentError, RangeError, Flowctl::DecodeError
        next # a sample a well-known type cannot print (a Duration of mixed signs, an Any of nothing)
      end
      write(dir, "#{i.chr}{}".b)
    end
    hand = ['{"timestamp":"2020-01-01T00:00:00.5+01:30","metrics":{"a":"NaN","b":"-Infinity","c":-0,"d":"1e3"}}',
            '{"payload":"-_8","metadata":{"k":null}}', '{"maxConcurrent":"12","inputEventTypes":["a","\\u00e9\\ud83c\\udf89"]}',
            '{"payload":"+/8=","bogus":{"x":[1,{"y":null}]}}', '{"processor_id":1e2,"processorId":"x"}',
            '{"component":{"type":"COMPONENT_TYPE_SOURCE","metadata":{"a":"b"}},"status":7}',
            '{"stellarCursor":{"ledgerSequence":"18446744073709551615","indexInLedger":4294967295}}',
            '{"duration":"-1.5s","value":{"a":[1,null,"x"]},"any":{"@type":"type.googleapis.com/google.protobuf.Duration","value":"2s"}}',
            '{"mask":"a.bC","i64":"7","object":{},"list":[true]}', '{"one":{"number":"1"},"maps":{"bColor":{"true":1}}}']
    hand.each { |t| FuzzJSON.pairs.size.times { |i| write(dir, i.chr.b + t.b) } }
  end

  def self.json_sample(f, rng)
    one = lambda do
      case f.type
      when :string then ["a", "é\n\u0000", ""].sample(random: rng)
      when :bytes then rng.bytes(rng.rand(0..5))
      when :bool then true
      when :double, :float then [1.5, -0.0, Float::NAN].sample(random: rng)
      when :enum then f.enum_values.keys.sample(random: rng)
      when :message then f.timestamp? ? Time.at(rng.rand(2**31), rng.rand(10**9), :nsec) : {}
      else rng.rand(1000)
      end
    end
    case f.label
    when :singular then one.call
    when :repeated then [one.call, one.call]
    else { "k" => one.call }
    end
  end

  # convert_target reads: one byte picking the class, then operations (see convert_target.c).
  def self.convert_seeds
    srand(1)
    40.times { |n| write(File.join(DIR, "convert"), Array.new(8 + (n * 7 % 120)) { rand(256) }.pack("C*")) }
  end
end

module FuzzSeeds
  # descriptor_target reads a FileDescriptorSet: the built-in protocols, the specs' acme
  # protocol (protoc must be installed), and a few small hand-made sets
  def self.descriptor_seeds
    dir = File.join(DIR, "descriptor")
    write(dir, File.binread(File.expand_path("../lib/flowctl/protocols.pb", __dir__)))
    fixtures = File.expand_path("../spec/fixtures", __dir__)
    out = "/tmp/flowctl-seed-acme.pb"
    system("protoc", "-I#{fixtures}", "-I/usr/include", "--include_imports", "--descriptor_set_out=#{out}",
           File.join(fixtures, "acme/orders.proto")) and write(dir, File.binread(out))
    pb = Flowctl::Protobuf
    small = pb::FileDescriptorProto.new(
      name: "s/s.proto", package: "s.v1", syntax: "proto3",
      enum_type: [{ name: "E", value: [{ name: "E_A", number: 0 }, { name: "E_B", number: -1 }] }],
      message_type: [{ name: "M", field: [{ name: "m", number: 1, type: :TYPE_MESSAGE, label: :LABEL_OPTIONAL,
                                            type_name: ".s.v1.M" },
                                          { name: "e", number: 2, type: :TYPE_ENUM, label: :LABEL_REPEATED,
                                            type_name: ".s.v1.E" }] }],
      service: [{ method: [{ name: "Do", input_type: ".s.v1.M", output_type: ".s.v1.M", client_streaming: true }],
                  name: "S" }]
    )
    write(dir, pb::FileDescriptorSet.new(file: [small]).to_proto)
    write(dir, "")
  end
end

# ruby fuzz/seeds.rb [decode convert descriptor json]: the targets' seeds (all by default)
(ARGV.empty? ? %w[decode convert descriptor json] : ARGV).each { |target| FuzzSeeds.send(:"#{target}_seeds") }
puts "seeds: #{Dir[File.join(FuzzSeeds::DIR, '*', '*')].size} files under #{FuzzSeeds::DIR}"
