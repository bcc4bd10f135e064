# frozen_string_literal: true

# Helpers for the message specs (spec/message_*_spec.rb): the list of message classes the
# seed protos must produce, their official google-protobuf twins (spec/gen), a description
# of every field taken from the official descriptors, value generators for interop runs,
# and a canonical form of a message's values from either gem so they can be compared
# exactly (doubles by bit pattern, so -0.0 and NaN count; strings with their encoding).
module MessageHelpers
  # Every message of the three seed files, by Ruby name => proto full name. Map entry
  # types (…MetadataEntry, …MetricsEntry) are deliberately absent: they are not classes.
  EXPECTED_CLASSES = {
    "Flowctl::ControlPlane::RegisterProcessorRequest" => "obsrvr.flow.controlplane.RegisterProcessorRequest",
    "Flowctl::ControlPlane::RegisterProcessorResponse" => "obsrvr.flow.controlplane.RegisterProcessorResponse",
    "Flowctl::ControlPlane::ProcessorHeartbeatRequest" => "obsrvr.flow.controlplane.ProcessorHeartbeatRequest",
    "Flowctl::ControlPlane::ProcessorHeartbeatResponse" => "obsrvr.flow.controlplane.ProcessorHeartbeatResponse",
    "Flowctl::ControlPlane::RegisterSourceRequest" => "obsrvr.flow.controlplane.RegisterSourceRequest",
    "Flowctl::ControlPlane::RegisterSourceResponse" => "obsrvr.flow.controlplane.RegisterSourceResponse",
    "Flowctl::ControlPlane::SourceHeartbeatRequest" => "obsrvr.flow.controlplane.SourceHeartbeatRequest",
    "Flowctl::ControlPlane::SourceHeartbeatResponse" => "obsrvr.flow.controlplane.SourceHeartbeatResponse",
    "Flowctl::ControlPlane::RegisterConsumerRequest" => "obsrvr.flow.controlplane.RegisterConsumerRequest",
    "Flowctl::ControlPlane::RegisterConsumerResponse" => "obsrvr.flow.controlplane.RegisterConsumerResponse",
    "Flowctl::ControlPlane::ConsumerHeartbeatRequest" => "obsrvr.flow.controlplane.ConsumerHeartbeatRequest",
    "Flowctl::ControlPlane::ConsumerHeartbeatResponse" => "obsrvr.flow.controlplane.ConsumerHeartbeatResponse",
    "Flowctl::Processor::DataMessage" => "obsrvr.flow.processor.DataMessage",
    "Flowctl::Processor::CapabilitiesRequest" => "obsrvr.flow.processor.CapabilitiesRequest",
    "Flowctl::Processor::CapabilitiesResponse" => "obsrvr.flow.processor.CapabilitiesResponse",
    "Flowctl::Common::Metrics" => "obsrvr.flow.common.Metrics"
  }.freeze

  # Under GC_STRESS=1 every allocation runs the GC: loops shrink so the suite still ends.
  STRESS = ENV["GC_STRESS"] == "1"

  # Field kinds: :string :bytes :int32 :bool :double :timestamp :repeated_string
  # :map_string (map<string,string>) :map_double (map<string,double>).
  Field = Struct.new(:name, :kind, :number)

  module_function

  def scaled(n, stress_n = [n / 20, 1].max) = STRESS ? stress_n : n

  def message_classes
    EXPECTED_CLASSES.keys.map { |n| Object.const_get(n) }
  end

  def official_class(klass)
    Official.load!
    Google::Protobuf::DescriptorPool.generated_pool.lookup(klass.descriptor_name).msgclass
  end

  # The fields of a Flowctl class, described from the official descriptor of the same proto.
  def fields_of(klass)
    @fields ||= {}
    @fields[klass] ||= begin
      off = official_class(klass)
      probe = off.new
      off.descriptor.map do |fd|
        Field.new(fd.name.to_sym, kind_of(fd, probe.public_send(fd.name)), fd.number)
      end.sort_by(&:number).freeze
    end
  end

  def kind_of(fd, probe)
    if probe.is_a?(Google::Protobuf::Map)
      key = fd.subtype.lookup("key").type
      value = fd.subtype.lookup("value").type
      raise "unexpected map<#{key}, #{value}>" unless key == :string && %i[string double].include?(value)

      value == :double ? :map_double : :map_string
    elsif probe.is_a?(Google::Protobuf::RepeatedField)
      raise "unexpected repeated #{fd.type}" unless fd.type == :string

      :repeated_string
    elsif fd.type == :message
      raise "unexpected message #{fd.subtype.name}" unless fd.subtype.name == "google.protobuf.Timestamp"

      :timestamp
    else
      fd.type
    end
  end

  # Default Ruby value of each kind in Flowctl.
  DEFAULTS = {
    string: "", bytes: "".b, int32: 0, bool: false, double: 0.0, timestamp: nil,
    repeated_string: [], map_string: {}, map_double: {}
  }.freeze

  # ---- canonical values ---------------------------------------------------------------

  def canon_double(v) = [Float(v)].pack("G").unpack1("H*")

  def canon_string(s)
    raise "not a String: #{s.inspect}" unless s.is_a?(String)

    [s.encoding.name, s.b]
  end

  def canon_time(t)
    t.nil? ? nil : [t.to_i, t.nsec]
  end

  # Canonical values of a Flowctl message: {field => comparable value}.
  def canon_flowctl(msg)
    fields_of(msg.class).to_h { |f| [f.name, canon_value(f.kind, msg.public_send(f.name))] }
  end

  # Canonical values of an official message, shaped like canon_flowctl.
  def canon_official(klass, off)
    fields_of(klass).to_h do |f|
      v = off.public_send(f.name)
      v = case f.kind
          when :timestamp then v && Time.at(v.seconds, v.nanos, :nsec)
          when :map_string, :map_double then v.to_h
          when :repeated_string then v.to_a
          else v
          end
      [f.name, canon_value(f.kind, v)]
    end
  end

  def canon_value(kind, v)
    case kind
    when :string, :bytes then canon_string(v)
    when :double then canon_double(v)
    when :timestamp then canon_time(v)
    when :repeated_string then v.map { |s| canon_string(s) }
    when :map_string then v.to_h { |k, s| [canon_string(k), canon_string(s)] }
    when :map_double then v.to_h { |k, d| [canon_string(k), canon_double(d)] }
    else v
    end
  end

  # Canonical values expected from plain Ruby field values (what was put in).
  def canon_input(klass, values)
    fields_of(klass).to_h do |f|
      v = values.fetch(f.name, DEFAULTS.fetch(f.kind))
      v = case f.kind
          when :string then v.dup.force_encoding(Encoding::UTF_8)
          when :bytes then v.b
          when :repeated_string then v.map { |s| s.dup.force_encoding(Encoding::UTF_8) }
          when :map_string then v.to_h { |k, s| [k.dup.force_encoding(Encoding::UTF_8), s.dup.force_encoding(Encoding::UTF_8)] }
          when :map_double then v.to_h { |k, d| [k.dup.force_encoding(Encoding::UTF_8), Float(d)] }
          else v
          end
      [f.name, canon_value(f.kind, v)]
    end
  end

  # An official message with the given plain Ruby values (Time for timestamps).
  def official_message(klass, values)
    args = values.to_h do |name, v|
      kind = fields_of(klass).find { |f| f.name == name }.kind
      v = Google::Protobuf::Timestamp.new(seconds: v.to_i, nanos: v.nsec) if kind == :timestamp && v
      [name, v]
    end
    official_class(klass).new(**args)
  end

  # ---- value generators ---------------------------------------------------------------

  UNICODE = ["a", "Z", "0", " ", "\0", "\n", "é", "ß", "Ω", "ж", "中", "文", "🎉", "𝄞", "\u200b", "\u{10FFFF}", "\u{FEFF}"].freeze
  EXTREME_DOUBLES = [0.0, -0.0, 1.0, -1.5, Float::MAX, -Float::MAX, Float::MIN, -Float::MIN,
                     5.0e-324, Float::INFINITY, -Float::INFINITY, Float::NAN, 1.0e300, 123_456.789].freeze
  EXTREME_INT32 = [0, 1, -1, 127, 128, -128, 2**31 - 1, -2**31, 300, -300].freeze
  EXTREME_TIMES = [
    Time.at(0, 0, :nsec), Time.at(0, 1, :nsec), Time.at(-1, 999_999_999, :nsec),
    Time.at(-62_135_596_800, 0, :nsec), # 0001-01-01T00:00:00Z, the Timestamp minimum
    Time.at(253_402_300_799, 999_999_999, :nsec), # 9999-12-31T23:59:59.999999999Z, the maximum
    Time.at(-1_234_567_890, 123_456_789, :nsec), Time.at(1_700_000_000, 987_654_321, :nsec)
  ].freeze

  def random_string(rng, max = 12)
    Array.new(rng.rand(0..max)) { UNICODE[rng.rand(UNICODE.size)] }.join
  end

  def random_bytes(rng, max = 64) = rng.bytes(rng.rand(0..max))

  def random_value(kind, rng, max_entries: 4)
    case kind
    when :string then random_string(rng)
    when :bytes then random_bytes(rng)
    when :int32 then rng.rand < 0.5 ? EXTREME_INT32.sample(random: rng) : rng.rand(-2**31...2**31)
    when :bool then rng.rand < 0.5
    when :timestamp then random_time(rng)
    when :repeated_string then Array.new(rng.rand(0..max_entries)) { random_string(rng) }
    when :map_string then random_map(rng, max_entries) { random_string(rng) }
    when :map_double then random_map(rng, max_entries) { random_double(rng) }
    else raise "no generator for #{kind}"
    end
  end

  def random_time(rng)
    return nil if rng.rand < 0.15
    return EXTREME_TIMES.sample(random: rng) if rng.rand < 0.4

    Time.at(rng.rand(-62_135_596_800..253_402_300_799), rng.rand(0..999_999_999), :nsec)
  end

  def random_double(rng)
    rng.rand < 0.5 ? EXTREME_DOUBLES.sample(random: rng) : (rng.rand - 0.5) * 10**rng.rand(-300..300)
  end

  def random_map(rng, max_entries)
    Array.new(rng.rand(0..max_entries)) { [random_string(rng, 6), yield] }.to_h
  end

  def random_values(klass, rng, **opts)
    fields_of(klass).to_h { |f| [f.name, random_value(f.kind, rng, **opts)] }
  end

  # True when every map of the values has at most one entry (bytes then are deterministic).
  def deterministic?(klass, values)
    fields_of(klass).all? { |f| !%i[map_string map_double].include?(f.kind) || values.fetch(f.name, {}).size <= 1 }
  end

  # ---- memory -------------------------------------------------------------------------

  def rss_kib
    File.read("/proc/self/status")[/^VmRSS:\s+(\d+)/, 1].to_i
  end

  # RSS after glibc has returned its free pages (falls back to plain RSS elsewhere): steady
  # to ~100 KiB between rounds, so a small leak per round shows.
  def trimmed_rss_kib
    @malloc_trim = begin
      require "fiddle"
      Fiddle::Function.new(Fiddle.dlopen(nil)["malloc_trim"], [Fiddle::TYPE_SIZE_T], Fiddle::TYPE_INT)
    rescue LoadError, Fiddle::DLError
      false
    end if @malloc_trim.nil?
    @malloc_trim&.call(0)
    rss_kib
  end
end
