# frozen_string_literal: true

# The message classes of the json fuzz target (fuzz/json_target.c) and of its seeds
# (fuzz/seeds.rb), in the order an input's first byte picks them: every built-in class
# with a google-protobuf twin generated from the same .proto (spec/gen: the seed's
# protocol, spec/gen/official_v1: flowctl.v1, found by name in google-protobuf's pool,
# never as Flowctl::V1 constants), google.protobuf.Empty, and the classes of the specs'
# JSON fixtures (spec/fixtures/json: every field type, oneofs, the well-known types),
# loaded with protoc's descriptor sets into both gems.
module FuzzJSON
  GEN = File.expand_path("../spec/gen", __dir__)
  OFFICIAL = %w[controlplane/controlplane_pb processor/processor_pb common/common_pb] +
             %w[empty any duration field_mask struct wrappers].map { |f| "google/protobuf/#{f}_pb" } +
             %w[common control_plane source processor consumer].map { |f| "official_flowctl/v1/#{f}_pb" }
  FIXTURES = File.expand_path("../spec/fixtures", __dir__)
  LOADED = Module.new # where the fixtures' classes go

  # The fixtures' message classes, loaded into Flowctl and into google-protobuf's pool.
  def self.fixture_classes(pool)
    require "tmpdir"
    %w[json/alltypes.proto json/wkt.proto].flat_map do |proto|
      out = File.join(Dir.mktmpdir("flowctl-fuzz"), "set.pb")
      system("protoc", "-I#{FIXTURES}", "-I/usr/include", "--include_imports", "--descriptor_set_out=#{out}",
             File.join(FIXTURES, proto)) or raise "protoc failed on #{proto}"
      set = File.binread(out)
      Flowctl::Protobuf::FileDescriptorSet.decode(set).file.each do |f|
        pool.add_serialized_file(f.to_proto) unless f.name.start_with?("google/protobuf/") || pool.lookup(f.message_type.first.then { |m| "#{f.package}.#{m.name}" })
      end
      # (not a wrapper at the top: google-protobuf "cannot parse a wrapper directly"; they
      # are fuzzed as the fields of jsontest.wkt.v1.Known)
      Flowctl.load_descriptor_set(set, root: LOADED).values
             .select { |k| k.is_a?(Class) && k < Flowctl::Message && !Flowctl::ProtoJSON::WRAPPERS.key?(k.descriptor_name) }
    end
  end

  def self.message_classes(mod)
    mod.constants.sort.flat_map do |c|
      k = mod.const_get(c, false)
      k.is_a?(Class) && k < Flowctl::Message ? [k, *message_classes(k)] : []
    end
  end

  # [[Flowctl class, google-protobuf class], ...] sorted by full proto name.
  def self.pairs
    @pairs ||= begin
      [GEN, File.join(GEN, "official_v1")].each { |d| $LOAD_PATH.unshift(d) unless $LOAD_PATH.include?(d) }
      require "google/protobuf"
      OFFICIAL.each { |f| require f }
      pool = Google::Protobuf::DescriptorPool.generated_pool
      mods = [Flowctl::ControlPlane, Flowctl::Processor, Flowctl::Common, Flowctl::V1]
      classes = mods.flat_map { |m| message_classes(m) } + [Flowctl::Protobuf::Empty] + fixture_classes(pool)
      classes.uniq.select { |k| pool.lookup(k.descriptor_name) }.sort_by(&:descriptor_name)
             .map { |k| [k, pool.lookup(k.descriptor_name).msgclass] }.freeze
    end
  end
end
