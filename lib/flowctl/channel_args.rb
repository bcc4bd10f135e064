# frozen_string_literal: true

module Flowctl
  # gRPC channel args ("grpc.*" options) for clients and servers, checked here once:
  # keys are Strings or Symbols, values Integers (C int), Strings, Symbols or booleans.
  # The C side (ext/flowctl/chanargs.c) converts what this returns and checks nothing.
  module ChannelArgs
    INT_RANGE = (-(2**31)..(2**31 - 1)).freeze

    # { "grpc.x" => Integer or String } with String keys, or TypeError/RangeError naming the key.
    def self.normalize(args)
      raise TypeError, "channel_args must be a Hash (given #{args.class})" unless args.is_a?(Hash)

      args.each_with_object({}) do |(k, v), out|
        unless k.is_a?(String) || k.is_a?(Symbol)
          raise TypeError, "channel_args keys must be String or Symbol (given #{k.class})"
        end

        key = k.to_s
        raise ArgumentError, "channel_args key #{key.inspect} contains a NUL byte" if key.include?("\0")

        out[key.freeze] = value(key, v)
      end.freeze
    end

    def self.value(key, v)
      case v
      when true, false then v ? 1 : 0
      when Integer
        raise RangeError, "channel_args[#{key.inspect}] = #{v} is outside a C int" unless INT_RANGE.cover?(v)

        v
      when String, Symbol
        s = v.to_s
        raise ArgumentError, "channel_args[#{key.inspect}] contains a NUL byte" if s.include?("\0")

        s.frozen? ? s : s.dup.freeze
      else
        raise TypeError, "channel_args[#{key.inspect}] must be Integer, String or boolean (given #{v.class})"
      end
    end
    private_class_method :value
  end
end
