# frozen_string_literal: true

# The message classes of the json fuzz target (fuzz/json_target.c) and of its seeds
# (fuzz/seeds.rb), in the order an input's first byte picks them: every built-in class
# with a google-protobuf twin generated from the same .proto (spec/gen: the seed's
# protocol, spec/gen/official_v1: flowctl.v1, found by name in google-protobuf's pool,
# never as Flowctl::V1 constants), plus google.protobuf.Empty.
module FuzzJSON
  GEN = File.expand_path("../spec/gen", __dir__)
  OFFICIAL = %w[controlplane/controlplane_pb processor/processor_pb common/common_pb google/protobuf/empty_pb] +
             %w[common control_plane source processor consumer].map { |f| "official_flowctl/v1/#{f}_pb" }

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
      classes = mods.flat_map { |m| message_classes(m) } + [Flowctl::Protobuf::Empty]
      classes.uniq.select { |k| pool.lookup(k.descriptor_name) }.sort_by(&:descriptor_name)
             .map { |k| [k, pool.lookup(k.descriptor_name).msgclass] }.freeze
    end
  end
end
