# frozen_string_literal: true

require "json"

module Flowctl
  # Live configuration of components (the gem's extension flowctl.ext.v1.ConfigService,
  # proto/flowctl/ext/v1/config.proto): Schema (what a component accepts), Store
  # (versions, history, rollback; in memory or SQLite), Service (the control plane's
  # handler), Watcher (the component's side: on_config and the acknowledgement).
  module Config
    # What a component accepts: keys, types, required, ranges, allowed values, defaults.
    #
    #   schema = Flowctl::Config::Schema.new(
    #     "rate" => { type: :integer, required: true, min: 1, max: 1000, default: 10 },
    #     "network" => { type: :string, allowed: %w[testnet mainnet] })
    #   schema.validate("rate" => 5000)  # raises Flowctl::InvalidArgument: config key "rate": 5000 is above the maximum 1000
    class Schema
      TYPES = %w[string integer number boolean].freeze
      Field = Struct.new(:name, :type, :required, :min, :max, :allowed, :default, :description, keyword_init: true)

      attr_reader :fields, :allow_unknown

      # fields: { "key" => { type:, required:, min:, max:, allowed:, default:, description: } }
      # (given as a Hash or as keywords)
      def initialize(fields = nil, allow_unknown: false, **keyword_fields)
        fields ||= {}
        raise TypeError, "a config schema is a Hash of key => options (given #{fields.class})" unless fields.is_a?(Hash)

        fields = fields.merge(keyword_fields)
        @fields = fields.to_h { |name, opts| [name.to_s, build_field(name.to_s, opts)] }.freeze
        @allow_unknown = allow_unknown ? true : false
        freeze
      end

      # From a Flowctl::Ext::V1::ConfigSchema message.
      def self.from_proto(msg)
        fields = msg.fields.to_h do |f|
          [f.name, { type: f.type, required: f.required, min: f.has_min ? f.min : nil, max: f.has_max ? f.max : nil,
                     allowed: f.allowed.map { |a| Config.decode_value(f.name, a) },
                     default: f.default.empty? ? nil : Config.decode_value(f.name, f.default),
                     description: f.description }]
        end
        new(fields, allow_unknown: msg.allow_unknown)
      end

      def to_proto
        Flowctl::Ext::V1::ConfigSchema.new(
          allow_unknown: allow_unknown,
          fields: fields.values.map do |f|
            Flowctl::Ext::V1::ConfigField.new(
              name: f.name, type: f.type, required: f.required, has_min: !f.min.nil?, min: f.min.to_f,
              has_max: !f.max.nil?, max: f.max.to_f, allowed: f.allowed.map { |v| JSON.generate(v) },
              default: f.default.nil? ? "" : JSON.generate(f.default), description: f.description.to_s
            )
          end
        )
      end

      def to_h
        { "allow_unknown" => allow_unknown,
          "fields" => fields.transform_values { |f| f.to_h.transform_keys(&:to_s) } }
      end

      def self.from_h(hash)
        new(hash.fetch("fields").transform_values { |f| f.transform_keys(&:to_sym).except(:name) },
            allow_unknown: hash["allow_unknown"])
      end

      # The defaults of every field that has one.
      def defaults = fields.values.reject { |f| f.default.nil? }.to_h { |f| [f.name, f.default] }

      # Raises Flowctl::InvalidArgument naming the first key that does not fit; returns values.
      def validate(values)
        fields.each_value do |f|
          raise InvalidArgument, "config key #{f.name.inspect} is required" if f.required && !values.key?(f.name)
        end
        values.each do |key, value|
          field = fields[key]
          if field.nil?
            next if allow_unknown

            raise InvalidArgument, "config key #{key.inspect} is not in the component's schema " \
                                   "(keys: #{fields.keys.join(', ')})"
          end
          check(field, value)
        end
        values
      end

      private

      def build_field(name, opts)
        opts = opts.transform_keys(&:to_sym)
        unknown = opts.keys - %i[type required min max allowed default description]
        raise ArgumentError, "config schema key #{name.inspect}: unknown option(s) #{unknown.join(', ')}" unless unknown.empty?

        type = opts.fetch(:type) { raise ArgumentError, "config schema key #{name.inspect}: type is missing" }.to_s
        raise ArgumentError, "config schema key #{name.inspect}: type must be one of #{TYPES.join(', ')} (given #{type.inspect})" unless TYPES.include?(type)

        field = Field.new(name: name, type: type, required: opts[:required] ? true : false, min: bound(name, opts[:min]),
                          max: bound(name, opts[:max]), allowed: Array(opts[:allowed]).freeze, default: opts[:default],
                          description: opts[:description].to_s)
        if (field.min || field.max) && !%w[integer number].include?(type)
          raise ArgumentError, "config schema key #{name.inspect}: min/max apply to integer and number keys only"
        end
        check(field, field.default) unless field.default.nil?
        field.freeze
      rescue InvalidArgument => e
        raise ArgumentError, "config schema key #{name.inspect}: default: #{e.message}"
      end

      # A bound as given (1 and 1.0 are the same bound: whole numbers are kept as Integer).
      def bound(name, value)
        return nil if value.nil?
        raise ArgumentError, "config schema key #{name.inspect}: min/max must be numbers (given #{value.inspect})" unless value.is_a?(Numeric)

        value.is_a?(Float) && value.finite? && value == value.floor ? value.to_i : value
      end

      def check(field, value)
        bad = ->(why) { raise InvalidArgument, "config key #{field.name.inspect}: #{why}" }
        case field.type
        when "string" then bad.call("expected a string (given #{JSON.generate(value)})") unless value.is_a?(String)
        when "integer" then bad.call("expected an integer (given #{JSON.generate(value)})") unless value.is_a?(Integer)
        when "number" then bad.call("expected a number (given #{JSON.generate(value)})") unless value.is_a?(Numeric)
        when "boolean" then bad.call("expected true or false (given #{JSON.generate(value)})") unless [true, false].include?(value)
        end
        bad.call("#{value} is below the minimum #{field.min}") if field.min && value < field.min
        bad.call("#{value} is above the maximum #{field.max}") if field.max && value > field.max
        return if field.allowed.empty? || field.allowed.include?(value)

        bad.call("#{JSON.generate(value)} is not one of #{field.allowed.map { |v| JSON.generate(v) }.join(', ')}")
      end
    end

    module_function

    # A value as the wire carries it (JSON text) -> Ruby; InvalidArgument names the key.
    def decode_value(key, text)
      JSON.parse(text, quirks_mode: true)
    rescue JSON::ParserError
      raise InvalidArgument, "config key #{key.inspect}: #{text.inspect} is not a JSON value " \
                             "(strings are quoted: \"\\\"testnet\\\"\")"
    end

    def decode_values(map) = map.to_h { |k, v| [k, decode_value(k, v)] }
    def encode_values(values) = values.to_h { |k, v| [k.to_s, JSON.generate(v)] }
  end
end
