# frozen_string_literal: true

module Flowctl
  # What one field of a message class is (reflection; read from the protobuf-c field
  # descriptor the codec uses, by Flowctl::Native.message_fields).
  #
  #   f = Flowctl::ControlPlane::ProcessorHeartbeatRequest.field_info(:metrics)
  #   f.name       # => :metrics
  #   f.json_name  # => "metrics"
  #   f.number     # => 3
  #   f.type       # => :double   (for a map: the value's type; :message, :enum, :string, :int64, ...)
  #   f.map?       # => true      (f.key_type => :string)
  class FieldDescriptor
    # name: Symbol as in the .proto; json_name: its lowerCamelCase name in proto3 JSON;
    # number: the field number; type: Symbol of the proto type of one value; label:
    # :singular, :repeated or :map; key_type: a map's key type (else nil); type_name:
    # full proto name of a message or enum type (else nil); message_class: the class of
    # a message-typed value (nil for scalars and google.protobuf.Timestamp, which is a Time).
    # oneof: the members of one oneof share this Integer (nil outside oneofs).
    attr_reader :name, :json_name, :number, :type, :label, :key_type, :type_name, :message_class, :oneof

    # row: one of Flowctl::Native.message_fields; json_name: the descriptor's (nil: as
    # protoc makes it from the name).
    def initialize(row, json_name = nil)
      @name, @number, @type, @label, @key_type, @presence, type_name, @message_class, enum_values, @packed, @oneof = row
      @type_name = type_name&.freeze
      @json_name = (json_name.nil? || json_name.empty? ? FieldDescriptor.json_name_of(@name.to_s) : json_name).freeze
      @enum_values = enum_values&.to_h { |n, v| [n.to_sym, v] }&.freeze
      freeze
    end

    def repeated? = @label == :repeated
    def map? = @label == :map
    def packed? = @packed

    # Whether an unset field differs from one set to its default: singular message
    # fields (Timestamp included), proto3 `optional` scalars and members of a oneof. Such
    # a field reads nil when unset.
    def has_presence? = @presence || !@oneof.nil? || (@label == :singular && @type == :message) # rubocop:disable Naming/PredicateName

    # A google.protobuf.Timestamp value: a Time in Ruby.
    def timestamp? = @type_name == "google.protobuf.Timestamp"

    # { NAME: number, ... } of an enum field's type (nil for other fields).
    attr_reader :enum_values

    # The enum module of an enum field (Flowctl::Common::HealthStatus), nil when the
    # field is not an enum or no module was defined for its type.
    def enum_module
      @type == :enum ? Flowctl.enum_module(@type_name) : nil
    end

    def inspect
      "#<#{self.class} #{@name} = #{@number} #{@label} #{@key_type ? "#{@key_type} => " : ''}" \
        "#{@type_name || @type}#{@oneof ? " (oneof #{@oneof})" : ''}#{@presence && !@oneof ? ' (optional)' : ''}>"
    end

    # protoc's json_name: underscores dropped, the letter after each one upcased.
    def self.json_name_of(name)
      out = +""
      up = false
      name.each_char do |c|
        if c == "_"
          up = true
        else
          out << (up ? c.upcase : c)
          up = false
        end
      end
      out
    end
  end

  # The fields of a message class: Klass.descriptor.
  #
  #   d = Flowctl::Processor::DataMessage.descriptor
  #   d.name                 # => "obsrvr.flow.processor.DataMessage"
  #   d.fields.map(&:name)   # => [:payload, :metadata]   (as declared)
  #   d.field("metadata")    # => #<Flowctl::FieldDescriptor metadata = 2 map string => string>
  class MessageDescriptor
    include Enumerable

    attr_reader :name, :message_class, :fields

    def initialize(klass)
      @message_class = klass
      @name = klass.descriptor_name.freeze
      @fields = build_fields(klass).freeze
      @by_name = {}
      @fields.each { |f| @by_name[f.name.to_s] = f }
      @fields.each { |f| @by_name[f.json_name] ||= f }
      @by_name.freeze
      freeze
    end

    # In declaration order with the descriptor's JSON names when a descriptor set gave
    # them (Descriptors.declared_fields), else in field number order.
    def build_fields(klass)
      rows = Native.message_fields(klass)
      declared = Descriptors.declared_fields(@name)
      return rows.map { |row| FieldDescriptor.new(row) } unless declared && declared.size == rows.size

      by_name = rows.to_h { |row| [row[0], row] }
      declared.map { |name, json| FieldDescriptor.new(by_name.fetch(name), json) }
    end
    private :build_fields

    # The field of that name (Symbol or String; the .proto name or the JSON name), or nil.
    def field(name)
      name = name.to_s if name.is_a?(Symbol)
      name.is_a?(String) ? @by_name[name] : nil
    end
    alias [] field

    def each(&) = @fields.each(&)

    def inspect = "#<#{self.class} #{@name} (#{@fields.map(&:name).join(', ')})>"
  end

  class Message
    # call-seq: Klass.descriptor -> Flowctl::MessageDescriptor
    def self.descriptor
      @descriptor ||= MessageDescriptor.new(self)
    end

    # call-seq: Klass.field_info(:name) -> Flowctl::FieldDescriptor
    #
    # ArgumentError when the class has no such field (.proto or JSON name).
    def self.field_info(name)
      descriptor.field(name) or
        raise ArgumentError, "#{self} has no field #{name.inspect} (fields: #{fields.join(', ')})"
    end
  end

  # The enum module of a full proto enum name ("obsrvr.flow.common.HealthStatus"), or
  # nil when no descriptor set defined one.
  def self.enum_module(full_name)
    mod = Descriptors.defined_type(full_name)
    mod.is_a?(Module) && mod.singleton_class.include?(Enum) ? mod : nil
  end
end
